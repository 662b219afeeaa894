"""examples/rag.py runs as users run it, on the offline demo model, and its vector database finds what exact
search finds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_rag_example_recall_against_exact_search(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "rag.py"), "--db", str(tmp_path / "qdrant")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("recall@10 against exact search: ") and "300 passages" in last, last
    assert float(last.split(": ")[1].split()[0]) >= 0.99
    # The topic of the best passage answers the question (the retrieval is not only self-consistent).
    assert "How do plants turn sunlight into sugar?\n  " in proc.stdout
    assert proc.stdout.split("sugar?\n  ", 1)[1].split("\n", 1)[0].split("] ")[0].endswith("[science")
