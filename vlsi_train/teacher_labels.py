"""Sequence-level distillation data: the teacher answers every question greedily, and its
answers replace the references (images and questions unchanged)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vlsi.atomic import atomic_write_text


def label_with_teacher(teacher_dir, data_path, out_path, batch_size: int = 32, max_new_tokens: int = 64,
                       limit: int | None = None, progress: bool = True) -> Path:
    """Write a LLaVA JSON copy of ``data_path`` whose answers are the teacher's greedy answers."""
    import torch
    from tqdm.auto import tqdm

    from vlsi.checkpoint import load_checkpoint
    from vlsi.data.encode import Encoder
    from vlsi.data.loaders import load_records
    from vlsi.generate import greedy_generate

    ck = load_checkpoint(teacher_dir, with_verbalizers=False)
    enc = Encoder(ck.adapter, ck.tokenizer, ck.image_processor, ck.model.config)
    records, _ = load_records(data_path)
    if limit:
        records = records[:limit]
    src = json.loads(Path(data_path).read_text())
    by_id = {str(item.get("id", i)): item for i, item in enumerate(src)}
    out_items, silent = [], 0
    with torch.inference_mode():
        for i in tqdm(range(0, len(records), batch_size), desc="teacher answers", disable=not progress):
            chunk = records[i:i + batch_size]
            batch = enc.collate([enc.encode(r, for_generation=True) for r in chunk], pad_left=True)
            ids = greedy_generate(ck.model, batch, max_new_tokens, enc.eos_ids)
            for r, x in zip(chunk, ids):
                if not x:  # the teacher ended its turn at once: nothing to learn from
                    silent += 1
                    continue
                item = dict(by_id[r.id])
                conv = [dict(t) for t in item["conversations"]]
                conv[-1]["value"] = ck.tokenizer.decode(x, skip_special_tokens=True)
                item["conversations"] = conv
                item["reference_answer"] = item.get("answer")
                item.pop("answer", None)
                out_items.append(item)
    if not out_items:
        from vlsi.errors import VLsIError

        raise VLsIError(f"teacher {teacher_dir} gave an empty answer to all {len(records)} questions: train it longer")
    if silent:
        print(f"teacher answers: {silent} of {len(records)} empty answers dropped")
    base = Path(data_path).parent
    out_path = Path(out_path)
    # image paths stay valid wherever the new file lives
    for item in out_items:
        if "image" in item and isinstance(item["image"], str) and not Path(item["image"]).is_absolute():
            item["image"] = str((base / item["image"]).resolve())
    atomic_write_text(out_path, json.dumps(out_items, indent=0) + "\n")
    return out_path


def shared_images(data_path, other_path) -> list[str]:
    """Ids of the records of ``data_path`` holding an image byte-equal to one of ``other_path``'s
    (any format :func:`~vlsi.data.loaders.load_records` reads): whether a pool is fresh."""
    from vlsi.data.loaders import load_records

    def digest(ref) -> bytes:
        return hashlib.sha256(ref if isinstance(ref, bytes) else Path(ref).read_bytes()).digest()

    def records(path):  # bytes compared, not decoded
        return load_records(path, check_images=False)[0]

    seen = {digest(ref) for r in records(other_path) for ref in r.images}
    return [r.id for r in records(data_path) if any(digest(ref) in seen for ref in r.images)]
