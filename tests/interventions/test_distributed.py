"""`torchrun` data parallelism: two CPU processes (gloo) give the single-process result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipes.cli import main
from support.models import make_model, make_tokenizer

ROOT = Path(__file__).parents[2]
TRACE = {"kind": "trace", "prompts": [{"prompt": "the eiffel tower is located in the city of",
                                       "subject": "eiffel tower"},
                                      {"prompt": "the colosseum is in the city of", "subject": "colosseum"}],
         "samples": 3, "window": 3, "max_batch_rows": 7}
PATCH = {"kind": "patch", "prompts": [{"base": "the eiffel tower is located in the city of",
                                       "source": "the colosseum tower is located in the city of"}],
         "sites": ["block_output", "mlp_output"], "metric": "logit_diff", "max_batch_rows": 5}
VLM_TRACE = {"kind": "trace", "samples": 2, "window": 2, "max_batch_rows": 6,
             "prompts": [{"image": "flag:France", "prompt": " the capital of", "target": "paris"},
                         {"image": "flag:Japan", "prompt": " its capital is", "target": "tokyo"}]}
VLM_PATCH = {"kind": "patch", "sites": ["block_output", "mlp_output"], "max_batch_rows": 5,
             "prompts": [{"image": "flag:France", "source_image": "flag:Italy", "base": " the capital of"}]}
VLM_TOWER = {"kind": "trace", "corruption": "patch_noise", "samples": 2, "sites": ["hidden"],
             "vision_sites": ["hidden", "mlp"], "max_batch_rows": 6,
             "prompts": [{"image": "flag:France", "prompt": " the capital of", "target": "paris"}]}
CLIP_TRACE = {"kind": "trace", "modality": "contrastive", "samples": 2, "max_batch_rows": 6,
              "classes": ["a red circle", "a blue circle", "a green square"],
              "prompts": [{"image": "scene:red circle@1", "target": "a red circle"},
                          {"image": "scene:green square@2", "target": "a green square"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("data", [TRACE, PATCH, VLM_TRACE, VLM_PATCH, VLM_TOWER, CLIP_TRACE],
                         ids=["trace", "patch", "vlm-trace", "vlm-patch", "vlm-tower", "clip-trace"])
def test_two_process_torchrun_equals_one_process(tmp_path, tokenizer, data, capsys):
    model = make_model("llama", len(tokenizer))
    if data.get("modality") == "contrastive":            # a tiny CLIP with the scenes testbed's word tokenizer
        from interventions.modalities.contrastive import scenes_clip

        model, tokenizer = scenes_clip.build(seed=0)
    elif any("image" in p for p in data["prompts"]):       # a tiny LLaVA around the tiny Llama
        from interventions.modalities.vision_language.llava import VisionSpec, assemble_llava

        model, tokenizer = assemble_llava(model, make_tokenizer(), VisionSpec(hidden_size=24, intermediate_size=48))
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(dict(data, model=str(tmp_path / "tiny"))))
    assert main(["run", str(spec), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(ROOT))  # same kernels
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           "-m", "recipes.cli", "run", str(spec), "--out", str(tmp_path / "two"), "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = load_file(str(tmp_path / "one" / "result.safetensors")), load_file(str(tmp_path / "two" / "result.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-7, rtol=0, equal_nan=True)
    meta = json.loads((tmp_path / "two" / "result.json").read_text())["meta"]
    assert meta["processes"] == 2
    assert json.loads((tmp_path / "one" / "result.json").read_text())["meta"]["processes"] == 1
