"""Lay out a Hugging Face cache that lets unmodified tinker-cookbook recipes start offline.

Run it with the cookbook venv's python (it needs `datasets`, which the main venv lacks):

    .venv-cookbook/bin/python tests/recipes/offline_cache.py HF_HOME \
        --model Qwen/Qwen3.5-9B-Base=/path/to/local/hf/model [--model ...] [--no-robots]

then run recipes with `HF_HOME=HF_HOME HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`.

* `--model REPO=DIR` copies DIR's tokenizer files and config.json (never the weights) into
  the hub-cache snapshot layout under REPO, so `AutoTokenizer.from_pretrained(REPO)` loads them
  with no network. Pointing DIR at the checkpoint the server serves under the same name keeps
  the client's tokenizer and the server's vocabulary in step.
* `--no-robots` writes a prepared `datasets` cache standing in for `HuggingFaceH4/no_robots`
  (what `recipes/sl_loop.py` loads), from the conversations JSONL that ships in the
  tinker_cookbook wheel. Offline, `datasets.load_dataset(REPO)` only consults its prepared
  cache (`<HF_HOME>/datasets/<ns>___<name>/<config>/<version>/<hash>/`, holding
  `dataset_info.json` and `<name>-<split>.arrow`), so that is written directly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


def _snapshot_dir(hub: Path, kind: str, repo_id: str, content_key: str) -> Path:
    """Create `<hub>/<kind>s--org--name/{refs/main, snapshots/<rev>}` and return the snapshot."""
    revision = hashlib.sha1(f"{kind}:{repo_id}:{content_key}".encode()).hexdigest()
    root = hub / f"{kind}s--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    if root.exists():
        shutil.rmtree(root)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    return snapshot


def add_model(hf_home: Path, repo_id: str, model_dir: Path) -> Path:
    """Alias `model_dir`'s tokenizer + config under `repo_id` (transformers 5 also reads config.json)."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES))
    if not any(p.name == "config.json" for p in files) or not any(p.name.startswith("tokenizer") for p in files):
        raise SystemExit(f"{model_dir} needs config.json and tokenizer files")
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()
    snapshot = _snapshot_dir(hf_home / "hub", "model", repo_id, digest)
    for path in files:
        shutil.copy2(path, snapshot / path.name)
    return snapshot


def write_prepared_dataset(
    hf_home: Path, repo_id: str, config_name: str, splits: dict[str, list[dict]]
) -> Path:
    """Write `splits` where an offline `load_dataset(repo_id, config_name)` finds them."""
    import datasets
    from datasets.arrow_writer import ArrowWriter
    from datasets.naming import camelcase_to_snakecase

    namespace, repo_name = repo_id.split("/")
    name = camelcase_to_snakecase(repo_name)  # as the datasets cache spells it in paths
    content = json.dumps(splits, sort_keys=True).encode()
    digest = hashlib.sha1(content).hexdigest()[:16]
    out = hf_home / "datasets" / f"{namespace}___{name}" / config_name / "0.0.0" / digest
    if out.parent.parent.exists():
        shutil.rmtree(out.parent.parent)
    out.mkdir(parents=True)

    split_dict = datasets.SplitDict(dataset_name=name)
    features = None
    for split, rows in splits.items():
        table = datasets.Dataset.from_list(rows, features=features)
        features = table.features
        with ArrowWriter(features=features, path=str(out / f"{name}-{split}.arrow")) as writer:
            writer.write_table(table.data.table)
            num_examples, num_bytes = writer.finalize()
        split_info = datasets.SplitInfo(name=split, num_examples=num_examples, num_bytes=num_bytes, dataset_name=name)
        split_dict.add(split_info)
    info = datasets.DatasetInfo(features=features, config_name=config_name, dataset_name=name, splits=split_dict)
    info.write_to_directory(str(out))
    return out


def bundled_conversations() -> list[dict]:
    text = (resources.files("tinker_cookbook") / "example_data" / "conversations.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def add_no_robots(hf_home: Path) -> Path:
    """A `HuggingFaceH4/no_robots` stand-in with the real columns; 7/8 train, 1/8 test."""
    rows = [
        {
            "prompt": next(m["content"] for m in conv["messages"] if m["role"] == "user"),
            "prompt_id": hashlib.sha1(json.dumps(conv["messages"]).encode()).hexdigest(),
            "messages": [{"role": m["role"], "content": m["content"]} for m in conv["messages"]],
            "category": "Chat",
        }
        for conv in bundled_conversations()
    ]
    cut = len(rows) * 7 // 8
    splits = {"train": rows[:cut], "test": rows[cut:]}
    return write_prepared_dataset(hf_home, "HuggingFaceH4/no_robots", "default", splits)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_home", type=Path)
    parser.add_argument("--model", action="append", default=[], metavar="REPO=DIR")
    parser.add_argument("--no-robots", action="store_true")
    args = parser.parse_args(argv)
    for spec in args.model:
        repo_id, sep, model_dir = spec.partition("=")
        if not sep or repo_id.count("/") != 1:
            parser.error(f"--model expects ORG/NAME=DIR, got {spec!r}")
        print(f"model {repo_id}: {add_model(args.hf_home, repo_id, Path(model_dir))}")
    if args.no_robots:
        print(f"dataset HuggingFaceH4/no_robots: {add_no_robots(args.hf_home)}")


if __name__ == "__main__":
    main()
