"""Offline ASR baselines on rawcast-tiny's held-out voices (same clips and WER as eval).

    python bench/baselines.py                       # pocketsphinx (and Whisper tiny if local)
    python bench/baselines.py --limit 60 --json out.json

Needs the recipe's data (``rawcast train`` generates it into data/rawcast-tiny) and
``pip install pocketsphinx``; Whisper tiny runs only when ``RAWCAST_WHISPER_DIR`` names
a local CTranslate2 copy (no model hub is reachable here).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from rawcast.model.recipe import baselines


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-dir", default="data/rawcast-tiny")
    ap.add_argument("--limit", type=int, default=None, help="first N held-out clips")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    print(f"# bench/baselines.py on {platform.processor() or platform.machine()}")
    out = baselines.score_all(Path(args.data_dir), args.limit)
    for name, r in out.items():
        if "unavailable" in r:
            print(f"{name}: not available ({r['unavailable']})")
            continue
        print(f"{name}: WER {r['wer']:.3f} on {r['clips']} clips ({r['seconds']} s)")
        for voice, w in r["wer_by_voice"].items():
            print(f"  {voice}: {w:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
