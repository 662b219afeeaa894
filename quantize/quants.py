"""The names of quants, best fidelity first: what both the quantizer and the pure planner need.

Kept apart from quantize/ladder.py, which loads llama.cpp's native library, so the planner can list and
order quants without it.
"""

# llama.cpp's quant ladder, best fidelity first: what `runner quantize` makes from an F16 GGUF.
LADDER = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"]
# llama.cpp's i-quants that `runner quantize` makes only with an importance matrix (quantize/imatrix.py): without
# one IQ3_XXS and IQ2_M are refused by llama.cpp and IQ4_XS/IQ3_M lose more than the K-quant of their size.
IQUANTS = ["IQ4_XS", "IQ3_M", "IQ3_XXS", "IQ2_M"]
# What the planner chooses from: the F16 file the converter writes, then the ladder. The i-quants are not in it:
# the planner has no retention figures for them yet, and a plan must not ask for a file that needs an imatrix.
FIDELITY = ["F16", *LADDER]
# The unquantized types a converted file can have; any of them is a source for the ladder.
UNQUANTIZED = ["F32", "F16", "BF16"]
# What a plan can pick without a measurement of the model's own files: FIDELITY, and BF16 beside F16 (the same bytes)
# for a model whose published weights are bfloat16, which a BF16 file holds exactly (planner.policy says when).
PLANNED = ["F16", "BF16", *LADDER]
# Every quant, by bits per weight on the 8B shape, highest first (the i-quants between the K-quants of their size).
QUANTS = [*LADDER[:6], "IQ4_XS", "Q3_K_L", "Q3_K_M", "IQ3_M", "Q3_K_S", "IQ3_XXS", "Q2_K", "IQ2_M"]
# F16, BF16 and every quant, by bits per weight: what the planner can size and a calibration can time.
SIZED = ["F16", "BF16", *QUANTS]
# Highest fidelity first: what `-m DIR` picks when no --quant is given.
PREFERENCE = [*UNQUANTIZED, *QUANTS]
# Tensors this project's quants keep at a higher type than llama.cpp's mix gives them, as (regex, type) overrides
# after the user's own (quantize.ladder's `tensor_types`; quantize.sizes counts them): found by measurement
# (`python -m bench.tensor_sensitivity`, docs/benchmarks.md "Which tensors the loss comes from"). attn_v is a
# small share of a GQA model's weights (a quarter of attn_q's on the 8B shape) and carries most of the loss.
RAISED_TENSORS: dict[str, tuple[tuple[str, str], ...]] = {
    q: ((r"attn_v\.weight$", "Q8_0"),) for q in LADDER[LADDER.index("Q5_K_M") :]
}
