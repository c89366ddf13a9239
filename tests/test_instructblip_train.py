"""``python -m runners.train`` end to end (train, evaluate, metrics) on tiny models and the fixture tree:
an InstructBLIP project YAML (OK-VQA, instruction template), a video captioning YAML (MSR-VTT clips of 4 frames
through BLIP-2 OPT), InstructBLIP on MSR-VTT QA clips, and the Q-Former plugin example YAML."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_runner import last_json_line, read_log, run_cli, subprocess_env

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.model_type=tiny", "model.weights=none", "model.load_pretrained=False", "model.hf_hub_id=null",
        "model.image_size=64", "model.vit_precision=fp32", "run.device=cpu", "run.amp=off", "run.num_workers=0",
        "run.batch_size_train=4", "run.batch_size_eval=4", "run.max_epoch=1", "run.warmup_steps=1",
        "run.init_lr=1e-4", "run.num_beams=2", "run.max_len=6", "run.min_len=1"]


def image_size_64(dataset: str) -> list[str]:
    return [f"datasets.{dataset}.vis_processor.{split}.name=blip_image_eval" for split in ("train", "eval")] + [
        f"datasets.{dataset}.vis_processor.{split}.image_size=64" for split in ("train", "eval")]


CASES = {
    "instruct_okvqa": ("projects/instructblip/okvqa_ft_flant5xl.yaml",
                       TINY + image_size_64("ok_vqa") + ["run.apply_lemmatizer=False"]),  # spaCy not needed
    "video_caption_opt": ("projects/instructblip/msrvtt_caption_ft_flant5xl.yaml",
                          TINY + image_size_64("msrvtt_caption") + ["model.arch=blip2_opt", "run.min_len=1"]),
    "video_qa_instruct": ("projects/instructblip/msrvtt_qa_ft_vicuna7b.yaml",
                          TINY + image_size_64("msrvtt_qa") + ["run.batch_size_train=2"]),  # 3 fixture clips
    "qformer_plugin": ("projects/examples/qformer_plugin_tiny.yaml", []),
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from tests.fixtures_data import make_lavis_tree

    paths = make_lavis_tree(tmp_path_factory.mktemp("lavis_tree"), with_video=True, with_shards=False)
    if not paths["has_video"]:
        pytest.skip("no mp4 writer (imageio[ffmpeg]) to make the MSR-VTT fixture clips")
    return paths["root"]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_runners_train_end_to_end(case, tmp_path, tree):
    from safetensors.torch import load_file

    path, options = CASES[case]
    env = subprocess_env()
    env["BLIP2_CACHE_ROOT"] = str(tree)
    options = options + [f"run.output_dir={tmp_path / 'out'}", f"run.job_name={case}", "run.log_freq=1"]
    proc = run_cli("runners.train", ["--cfg", str(REPO_ROOT / path), "--options", *options], env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = last_json_line(proc.stdout)
    job = Path(summary["job_dir"])
    steps = [r for r in read_log(job) if r["type"] == "train_step"]
    assert steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    metrics = summary["results"]["test"]
    assert "agg_metrics" in metrics
    if case in ("instruct_okvqa", "video_qa_instruct"):
        assert metrics["num_questions"] > 0 and 0.0 <= metrics["agg_metrics"] <= 100.0
    else:
        assert {"Bleu_4", "CIDEr"} <= set(metrics)
    weights = load_file(sorted((job / "checkpoints").iterdir())[-1] / "model.safetensors")
    assert "query_tokens" in weights and not any(
        k.startswith(("visual_encoder.", "opt_model.", "t5_model.", "llm_model.")) for k in weights)
    if case == "instruct_okvqa":  # the instruction-aware Q-Former trains its text path too
        assert "Qformer.bert.embeddings.word_embeddings.weight" in weights and "t5_proj.weight" in weights
    if case == "qformer_plugin":  # the plugin's narrow query FFN is what was trained
        assert weights["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape == (32, 64)
