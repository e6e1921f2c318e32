"""llama.cpp's own tools on a vlsi GGUF pair, as a user runs them: llama-cpp-python's ``Llama`` +
``MTMDChatHandler`` (and its OpenAI-compatible server) with plain OpenAI messages and
``temperature=0`` answer as the PyTorch model does on real synthetic test questions.

The model is a quickstart-sized student trained briefly on the quickstart's kind of data (56 px
images, one object on a 2x2 grid), so its answers depend on the image and its logits are peaked;
56 px is below the 8 image tokens llama.cpp's clip grows every Qwen2-VL image to, which is what
the tiny processor's bounds must match. The questions are asked through
``scripts/llama_tools_agreement.py``, the script anyone can rerun on their own checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="the gguf extra is not installed")
gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")

pytestmark = pytest.mark.slow

N_QUESTIONS = 30
AGREEMENT = 0.95  # NVIDIA's model CI bar for answer agreement with the HF model (DESIGN.md)
TRAIN_STEPS = 400
"""About a minute on an idle 2-core CPU. With 250 steps the student still answers from the text
alone (one answer per question family), which would make the agreement meaningless."""
ROOT = Path(__file__).resolve().parents[1]


def _tools():
    path = ROOT / "scripts" / "llama_tools_agreement.py"
    spec = importlib.util.spec_from_file_location("llama_tools_agreement", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


tools = _tools()


@pytest.fixture(scope="module")
def data56(tmp_path_factory):
    """The quickstart's data design (vlsi_train/quickstart.py), small."""
    from vlsi.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth56") / "data"
    generate(out, SynthConfig(n=1200, seed=0, n_eval=N_QUESTIONS, image_size=56, grid=2, min_objects=1, max_objects=1,
                              families=("colour", "shape", "describe"), mc=False), progress=False)
    return out


@pytest.fixture(scope="module")
def ckpt(data56, tmp_path_factory):
    """``tiny:qs_student`` pretrained briefly: answers that follow the image, peaked logits."""
    import torch

    from vlsi.config import load_config
    from vlsi_train.config import TrainConfig
    from vlsi_train.trainer import train

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("llama-tools") / "student"
    kv = dict(arch="qwen2_vl", data=str(data56 / "train.json"), model="tiny:qs_student", stage="pretrain",
              out=str(out), steps=TRAIN_STEPS, batch_size=8, log_every=TRAIN_STEPS, progress=False,
              **{"optim.lr": 3e-3})
    train(load_config(TrainConfig, None, [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in kv.items()]))
    return out


@pytest.fixture(scope="module")
def artifact(ckpt, tmp_path_factory):
    from vlsi_export import get_target

    return get_target("gguf")(ckpt, tmp_path_factory.mktemp("llama-tools-gguf") / "f16", quant="f16", validate=False)


@pytest.fixture(scope="module")
def questions(data56):
    return tools.questions(data56, N_QUESTIONS)


@pytest.fixture(scope="module")
def reference(ckpt, questions):
    answers = tools.ask_torch(ckpt, questions)
    # the check means something only if the answers follow the image
    assert len(set(answers)) >= 5, f"the briefly trained model answers {set(answers)}; train it longer"
    return answers


@pytest.fixture(scope="module")
def llm(artifact):
    return tools.open_handler(artifact, threads=2)


def _report(name, r):
    lines = [f"{name}: {r['agree']}/{r['n']} answers agree with the PyTorch model"]
    lines += [f"  {d['id']} {d['question']!r}: torch {d['torch']!r}, {name} {d['other']!r}" for d in r["disagreements"]]
    return "\n".join(lines)


def test_the_gguf_carries_the_training_layout_and_the_processor_bounds(artifact):
    from vlsi.archs.qwen2_vl.spec import Qwen2VLSpec
    from vlsi.chat import chat_template
    from vlsi.manifest import load_manifest

    text, mmproj = tools.gguf_files(artifact)
    r = gguf.GGUFReader(str(text))
    assert r.fields["tokenizer.chat_template"].contents() == chat_template(Qwen2VLSpec.image_marker)
    pre = json.loads((artifact / "preprocessor_config.json").read_text())
    m = gguf.GGUFReader(str(mmproj))
    assert m.fields["clip.vision.image_min_pixels"].contents() == pre["size"]["shortest_edge"] == 8 * 28 * 28
    assert m.fields["clip.vision.image_max_pixels"].contents() == pre["size"]["longest_edge"] == 4096 * 28 * 28
    details = load_manifest(artifact).graph("mmproj").details
    assert details["clip_resize"] == {"clip_image_tokens": [8, 4096], "processor_image_tokens": [8, 4096],
                                      "differs": False}


def test_the_handler_renders_vlsis_prompt(llm, ckpt, questions):
    """Same text layout, no BOS, and as many image tokens as the processor gives (clip's own resize)."""
    for q in questions[:3]:
        text, ids = tools.handler_prompt(llm, q)
        assert text.endswith(f"<|im_start|>user\n<__media__>\n{q.text}<|im_end|>\n<|im_start|>assistant\n")
        assert ids == tools.vlsi_prompt_ids(ckpt, q)


def test_mtmd_chat_handler_answers_as_pytorch(llm, artifact, questions, reference):
    """Plain messages and temperature=0, everything else the handler's defaults (repeat_penalty 1.1)."""
    r = tools.compare(reference, tools.ask_handler(artifact, questions, llm=llm), questions)
    assert r["rate"] >= AGREEMENT, _report("MTMDChatHandler", r)


def test_llama_cpp_server_answers_as_pytorch(artifact, questions, reference):
    why = tools.server_available()
    assert not why, f"{why} (the dev extra installs llama-cpp-python's server dependencies)"
    with tools.llama_server(artifact, threads=2) as url:
        r = tools.compare(reference, tools.ask_server(url, questions), questions)
    assert r["rate"] >= AGREEMENT, _report("llama_cpp.server", r)
