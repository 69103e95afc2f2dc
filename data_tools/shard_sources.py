"""Find the videos of a source folder and their captions (CSV, sidecar .txt, or sidecar .json)."""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from magi_train.data.shard_format import VIDEO_EXTS

_PATH_COLUMNS = ("path", "file", "filename", "video", "key", "name")
_CAPTION_COLUMNS = ("caption", "text", "prompt", "description")


@dataclass
class SourceVideo:
    path: Path
    rel: str                              # path relative to the source folder, with '/' separators
    caption: str | None = None
    caption_source: str = ""              # csv | txt | json
    sidecar: dict = field(default_factory=dict)   # sidecar json without its caption (e.g. trajectories)
    problem: str = ""                     # why the captions/sidecars are unusable, if they are


def find_videos(src_dir: str | Path) -> list[Path]:
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"src_dir: not a directory: {src}")
    found = [p for p in src.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in VIDEO_EXTS
             and not p.name.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(src).as_posix())


def read_captions_csv(path: str | Path) -> dict[str, str]:
    """{path-like key: caption} from a CSV with a header naming a path column and a caption column."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"captions_csv: not a file: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = {c.lower().strip(): c for c in (reader.fieldnames or [])}
        pcol = next((cols[c] for c in _PATH_COLUMNS if c in cols), None)
        ccol = next((cols[c] for c in _CAPTION_COLUMNS if c in cols), None)
        if pcol is None or ccol is None:
            raise ValueError(f"captions_csv: needs a header with a path column ({', '.join(_PATH_COLUMNS)}) and a "
                             f"caption column ({', '.join(_CAPTION_COLUMNS)}), got {reader.fieldnames}")
        return {row[pcol].strip(): (row[ccol] or "").strip() for row in reader if row.get(pcol)}


def _csv_lookup(table: dict[str, str], rel: str) -> str | None:
    stem_rel = rel.rsplit(".", 1)[0]
    name = rel.rsplit("/", 1)[-1]
    for k in (rel, "./" + rel, stem_rel, name, name.rsplit(".", 1)[0]):
        if k in table:
            return table[k]
    return None


def attach_captions(src_dir: str | Path, videos: list[Path], captions_csv: str | Path | None) -> list[SourceVideo]:
    src = Path(src_dir)
    table = read_captions_csv(captions_csv) if captions_csv else {}
    out = []
    for p in videos:
        sv = SourceVideo(p, p.relative_to(src).as_posix())
        txt, js = p.with_suffix(".txt"), p.with_suffix(".json")
        try:
            if js.exists():
                doc = json.loads(js.read_text(encoding="utf-8"))
                if isinstance(doc, dict):
                    cap = doc.pop("caption", None)
                    if isinstance(cap, str):
                        sv.caption, sv.caption_source = cap.strip(), "json"
                    sv.sidecar = doc
                else:
                    sv.sidecar = {"value": doc}
            if txt.exists():
                sv.caption, sv.caption_source = txt.read_text(encoding="utf-8").strip(), "txt"
        except (ValueError, UnicodeDecodeError, OSError) as e:
            sv.problem = f"unreadable sidecar ({type(e).__name__}: {e})"
        cap = _csv_lookup(table, sv.rel) if table else None
        if cap is not None:
            sv.caption, sv.caption_source = cap, "csv"
        out.append(sv)
    return out


def sample_key(rel: str, taken: set[str]) -> str:
    """A webdataset key from a relative path: no dots (they start the extension), '/' -> '__', unique."""
    base = re.sub(r"[^A-Za-z0-9_\-]", "_", rel.rsplit(".", 1)[0].replace("/", "__")) or "sample"
    key, n = base, 1
    while key in taken:
        key, n = f"{base}-{n}", n + 1
    taken.add(key)
    return key
