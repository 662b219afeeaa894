"""Deterministic synthetic text corpus for the benches and the GPU check.

Texts are built from hand-written seed sentences grouped by topic, so texts
drawn from the same topic are semantically related and nearest-neighbour
overlap between two embedders is a meaningful measure.
"""

import random
import statistics

TOPICS: dict[str, tuple[str, ...]] = {
    "science": (
        (
            "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen inside "
            "the chloroplasts of plant cells."
        ),
        (
            "The speed of light in a vacuum is about 299,792 kilometres per second, and nothing carrying "
            "information can travel faster."
        ),
        (
            "DNA stores genetic information as a sequence of four bases, and each group of three bases "
            "encodes a single amino acid."
        ),
        (
            "Black holes form when massive stars collapse under their own gravity, bending spacetime so "
            "strongly that not even light escapes."
        ),
        (
            "The periodic table arranges elements by atomic number, revealing recurring patterns in their "
            "chemical properties."
        ),
        (
            "Entropy in an isolated system never decreases, which is why heat flows spontaneously from "
            "hot objects to cold ones."
        ),
        (
            "Plate tectonics explains earthquakes, volcanoes and mountain ranges as the result of slowly "
            "moving slabs of the Earth's crust."
        ),
        (
            "Quantum mechanics describes particles with wave functions, and measuring a system changes "
            "the probabilities of its possible states."
        ),
    ),
    "cooking": (
        (
            "To make a good risotto, add warm stock one ladle at a time and stir until each addition is "
            "absorbed by the rice."
        ),
        (
            "Searing meat in a very hot pan creates a brown crust through the Maillard reaction, which "
            "adds deep savoury flavour."
        ),
        (
            "Bread dough needs time to rise; a slow overnight fermentation in the fridge gives a more "
            "complex taste and an open crumb."
        ),
        (
            "Always taste your sauce before serving and adjust it with salt, acid or a little sugar until "
            "the flavours are balanced."
        ),
        (
            "Blanch green vegetables briefly in boiling salted water, then plunge them into ice water to "
            "keep their colour bright."
        ),
        (
            "A sharp knife is safer than a dull one because it cuts cleanly and is less likely to slip "
            "off the surface of the food."
        ),
        ("Let roasted meat rest for ten minutes under loose foil so that the juices redistribute before you slice it."),
        (
            "Toasting whole spices in a dry pan for a minute releases their aromatic oils and makes a "
            "curry far more fragrant."
        ),
    ),
    "law": (
        (
            "A contract is generally enforceable when there is an offer, an acceptance, consideration and "
            "an intention to create legal relations."
        ),
        (
            "Under the doctrine of precedent, lower courts must follow the legal principles established "
            "by higher courts in similar cases."
        ),
        (
            "The burden of proof in a criminal trial lies with the prosecution, which must prove guilt "
            "beyond a reasonable doubt."
        ),
        (
            "A tenant who withholds rent without following the statutory procedure may face eviction even "
            "if the landlord failed to make repairs."
        ),
        (
            "Intellectual property law protects inventions through patents, creative works through "
            "copyright and brand names through trademarks."
        ),
        (
            "The appeal was dismissed because the appellant had not raised the constitutional argument "
            "before the trial court."
        ),
        (
            "Data protection regulations require companies to have a lawful basis for processing personal "
            "information and to keep it secure."
        ),
        (
            "A will must usually be signed in the presence of two independent witnesses to be valid in "
            "most common law jurisdictions."
        ),
    ),
    "sports": (
        (
            "She scored the winning goal in the final minute of extra time, sending the home crowd into "
            "wild celebration."
        ),
        (
            "Marathon runners usually taper their training during the last three weeks so that their legs "
            "are fresh on race day."
        ),
        (
            "The tennis match lasted nearly five hours, with the decisive set finally settled by a "
            "tiebreak after midnight."
        ),
        (
            "In basketball, a strong defensive rotation forces opponents into low-percentage shots late "
            "in the shot clock."
        ),
        (
            "The cycling team protected its leader on the mountain stages, pacing him up the climbs and "
            "shielding him from the wind."
        ),
        (
            "The coach changed the formation at half-time, moving to three central defenders to contain "
            "the opponent's fast wingers."
        ),
        (
            "Swimmers train their turns and underwater kicks carefully, because races are often decided "
            "by hundredths of a second."
        ),
        (
            "After a season-ending knee injury, the striker spent nine months in rehabilitation before "
            "returning to full training."
        ),
    ),
    "programming": (
        (
            "A hash map gives average constant-time lookups by storing values in buckets selected by the "
            "hash of each key."
        ),
        (
            "Write unit tests for edge cases such as empty inputs, very large values and invalid types, "
            "not only for the happy path."
        ),
        (
            "Python's garbage collector uses reference counting plus a cycle detector to reclaim objects "
            "that refer to each other."
        ),
        (
            "A race condition occurs when two threads access shared data concurrently and at least one of "
            "them modifies it without a lock."
        ),
        (
            "Version control lets a team work on separate branches and merge their changes, keeping a "
            "full history of every commit."
        ),
        (
            "Profiling the program showed that most of the time was spent serialising JSON inside a tight "
            "loop, not in the database."
        ),
        (
            "Dependency injection makes code easier to test because components receive their "
            "collaborators instead of creating them."
        ),
        (
            "Rust's borrow checker enforces at compile time that a value has either one mutable reference "
            "or many immutable ones."
        ),
    ),
    "history": (
        "The Roman Empire reached its greatest territorial extent under Trajan in the early second century.",
        (
            "The printing press, introduced in Europe by Gutenberg around 1450, made books cheaper and "
            "spread literacy rapidly."
        ),
        (
            "The Industrial Revolution began in Britain in the late eighteenth century, driven by coal, "
            "steam power and textile mills."
        ),
        ("The fall of the Berlin Wall in November 1989 marked the beginning of the end of the Cold War in Europe."),
        (
            "The Silk Road connected China with the Mediterranean, carrying silk, spices, ideas and "
            "diseases across Central Asia."
        ),
        (
            "The French Revolution of 1789 overthrew the monarchy and spread ideas of citizenship, "
            "equality and popular sovereignty."
        ),
        (
            "Ancient Egyptians built the pyramids of Giza as monumental tombs for pharaohs more than four "
            "thousand years ago."
        ),
        (
            "The Meiji Restoration of 1868 transformed Japan from a feudal society into a rapidly "
            "industrialising modern state."
        ),
    ),
    "medicine": (
        (
            "Vaccines train the immune system to recognise a pathogen, so the body can respond quickly if "
            "it meets the real infection."
        ),
        (
            "High blood pressure often has no symptoms, which is why regular screening is important for "
            "adults over forty."
        ),
        (
            "Antibiotics treat bacterial infections but have no effect on viruses, and overuse "
            "accelerates antimicrobial resistance."
        ),
        (
            "The patient reported mild headaches and dizziness after starting the new medication, so the "
            "dose was reduced."
        ),
        (
            "Type 2 diabetes can often be managed with diet, exercise and medication that improves the "
            "body's response to insulin."
        ),
        (
            "A randomised controlled trial compares a treatment group with a control group to estimate "
            "the effect of an intervention."
        ),
        ("Regular physical activity lowers the risk of heart disease, stroke, depression and several types of cancer."),
        ("Sleep deprivation impairs concentration, weakens the immune response and increases the risk of accidents."),
    ),
    "finance": (
        (
            "The central bank raised interest rates by a quarter of a percentage point to bring inflation "
            "back towards its target."
        ),
        (
            "Diversifying a portfolio across asset classes reduces risk because different investments "
            "rarely fall at the same time."
        ),
        (
            "Compound interest means that returns are earned on previous returns, so starting to save "
            "early makes a large difference."
        ),
        (
            "The company's quarterly earnings beat analyst expectations, and its share price rose eight "
            "percent in early trading."
        ),
        ("Bond prices move inversely to interest rates, so long-dated bonds lose value when rates rise unexpectedly."),
        (
            "An emergency fund covering three to six months of expenses protects a household from having "
            "to borrow at high rates."
        ),
        ("Index funds track a market benchmark at low cost and often outperform actively managed funds after fees."),
        (
            "The startup raised a new funding round at a higher valuation, giving it enough runway for "
            "another two years."
        ),
    ),
    "travel": (
        (
            "Our flight to Lisbon was delayed by three hours because of a storm, so we missed the "
            "connecting train to Porto."
        ),
        ("Booking accommodation early in the summer season usually secures better prices and more central locations."),
        (
            "The old town is best explored on foot, with narrow cobbled streets, small squares and cafes "
            "on every corner."
        ),
        (
            "Remember to check whether your passport is valid for at least six months beyond your planned "
            "date of return."
        ),
        "The overnight train through the Alps offered spectacular views of snow-covered peaks at sunrise.",
        (
            "Travel insurance is worth buying for long trips, especially if it covers medical treatment "
            "and cancellations."
        ),
        (
            "We rented a small car to drive along the coast, stopping at fishing villages and quiet "
            "beaches along the way."
        ),
        ("Learning a few phrases in the local language makes it much easier to ask for directions and order food."),
    ),
    "music": (
        (
            "Beethoven composed his Ninth Symphony while almost completely deaf, conducting its premiere "
            "in Vienna in 1824."
        ),
        (
            "Jazz emerged in New Orleans in the early twentieth century, blending blues, ragtime and "
            "brass band traditions."
        ),
        (
            "A major chord consists of a root, a major third and a perfect fifth, and it generally sounds "
            "bright and stable."
        ),
        (
            "The band recorded the album live in the studio to capture the energy of their concerts, with "
            "very few overdubs."
        ),
        ("Practising scales slowly with a metronome builds finger independence and a reliable sense of rhythm."),
        (
            "Streaming has changed how musicians earn money, shifting income from record sales towards "
            "touring and merchandise."
        ),
        ("The orchestra tuned to an A of 440 hertz played by the oboe before the conductor walked onto the stage."),
        (
            "Hip hop grew out of block parties in the Bronx in the 1970s, where DJs looped the "
            "instrumental breaks of funk records."
        ),
    ),
    "climate": (
        (
            "Global average temperatures have risen by about 1.1 degrees Celsius since pre-industrial "
            "times, mainly due to fossil fuels."
        ),
        (
            "Melting glaciers and the thermal expansion of seawater are both contributing to rising sea "
            "levels worldwide."
        ),
        ("Solar and wind power have become the cheapest sources of new electricity generation in many countries."),
        ("Heatwaves are becoming more frequent and more intense, putting pressure on health systems and power grids."),
        (
            "Forests absorb large amounts of carbon dioxide, so deforestation both releases carbon and "
            "removes a natural sink."
        ),
        ("Carbon pricing makes polluters pay for their emissions and encourages investment in cleaner technologies."),
        (
            "Coral reefs are bleaching more often as ocean temperatures rise, threatening the species "
            "that depend on them."
        ),
        ("Cities are planting trees and adding green roofs to reduce the urban heat island effect during hot summers."),
    ),
    "customer_support": (
        (
            "Thank you for contacting support; we are sorry that your order arrived damaged and will send "
            "a replacement today."
        ),
        (
            "To reset your password, click the link on the sign-in page and follow the instructions sent "
            "to your email address."
        ),
        ("Your refund has been processed and should appear on your statement within five to seven business days."),
        ("Could you please send us your order number and a screenshot of the error message so we can investigate?"),
        (
            "We have escalated your ticket to our technical team, and an engineer will contact you within "
            "twenty-four hours."
        ),
        (
            "If the app keeps crashing, try clearing its cache, updating to the latest version and "
            "restarting your device."
        ),
        (
            "Your subscription will renew automatically on the first of next month unless you cancel it "
            "in your account settings."
        ),
        (
            "We apologise for the long waiting time on the phone line; our team is handling an unusually "
            "high volume of calls."
        ),
    ),
    "astronomy": (
        (
            "The James Webb Space Telescope observes in the infrared, allowing it to see the light of the "
            "earliest galaxies."
        ),
        "Jupiter's Great Red Spot is a giant storm larger than the Earth that has been raging for centuries.",
        ("A light year is the distance light travels in one year, roughly nine and a half trillion kilometres."),
        ("Exoplanets are often detected by the tiny dip in a star's brightness as the planet passes in front of it."),
        ("The Moon always shows the same face to the Earth because its rotation is tidally locked to its orbit."),
        ("Neutron stars are so dense that a teaspoon of their material would weigh billions of tonnes on Earth."),
    ),
    "gardening": (
        ("Tomatoes need at least six hours of direct sunlight a day and regular, deep watering to avoid split fruit."),
        ("Adding compost to heavy clay soil improves drainage and feeds the microorganisms that keep plants healthy."),
        ("Prune fruit trees in late winter, while they are dormant, to encourage strong growth and a better harvest."),
        ("Companion planting, such as growing marigolds beside vegetables, can help deter some common garden pests."),
        (
            "Mulching around shrubs keeps the soil moist, suppresses weeds and slowly adds organic matter "
            "as it breaks down."
        ),
        "Seedlings grown indoors should be hardened off gradually before they are planted out in the garden.",
    ),
}

_PREFIXES: tuple[str, ...] = (
    "",
    "",
    "",
    "",
    "In short, ",
    "Note that ",
    "As a reminder, ",
    "It is worth knowing that ",
    "According to the article, ",
    "Many people do not realise that ",
    "Interestingly, ",
)
_SUFFIXES: tuple[str, ...] = (
    "",
    "",
    "",
    "",
    " This is widely accepted.",
    " That is the key point.",
    " More details follow below.",
    " Keep this in mind.",
    " Experts tend to agree on this.",
)
_JOINERS: tuple[str, ...] = (" ", " ", " ", "\n", " Also, ", " Moreover, ")


_KEEP_CASE = frozenset({"DNA", "Python's", "Rust's", "Jupiter's", "Beethoven"})


def _lower_first(s: str) -> str:
    if s.split(" ", 1)[0] in _KEEP_CASE:
        return s
    return s[:1].lower() + s[1:]


def _vary(sentence: str, rng: random.Random) -> str:
    prefix = rng.choice(_PREFIXES)
    if prefix:
        sentence = prefix + _lower_first(sentence)
    return sentence + rng.choice(_SUFFIXES)


def _text(rng: random.Random) -> str:
    sentences = TOPICS[rng.choice(sorted(TOPICS))]
    # Skewed towards short texts but regularly reaching the full 8 sentences.
    k = min(len(sentences), rng.choice((1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8)))
    picked = [_vary(s, rng) for s in rng.sample(sentences, k)]
    out = picked[0]
    for s in picked[1:]:
        joiner = rng.choice(_JOINERS)
        out += joiner + (_lower_first(s) if joiner.endswith(", ") else s)
    return out


def corpus(n: int = 1200, seed: int = 0) -> list[str]:
    """Return ``n`` distinct texts, deterministic for a given ``seed``."""
    rng = random.Random(seed)
    seen: set[str] = set()
    texts: list[str] = []
    while len(texts) < n:
        text = _text(rng)
        attempt = 0
        while text in seen:
            attempt += 1
            text = _text(rng) if attempt < 20 else f"{text} (see note {len(texts)})"
        seen.add(text)
        texts.append(text)
    return texts


if __name__ == "__main__":
    docs = corpus()
    lengths = sorted(len(t) for t in docs)
    print(f"count={len(docs)} distinct={len(set(docs))}")
    print(f"chars min={lengths[0]} median={statistics.median(lengths)} max={lengths[-1]}")
