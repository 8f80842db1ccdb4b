"""`tokenpool serve DIR --lora-modules a=X b=Y`, as vLLM's --lora-modules takes several adapters after one flag
(README: "as vLLM's multi-LoRA"): each value is an adapter, not a MODEL_DIR (`b=Y` was read as a model folder that
did not exist, and a JSON one as `/cwd/{"name": ...}`)."""

from controller.cli import served_names_as_vllm


def test_several_adapters_after_one_flag(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    spec = '{"name": "c", "path": "/ad/c", "base_model_name": "m"}'
    argv = [str(model), "--lora-modules", "a=/ad/a", "b=/ad/b", spec, "--port", "1"]
    assert served_names_as_vllm(argv) == [str(model), "--lora-modules", "a=/ad/a", "--lora-modules", "b=/ad/b",
                                          "--lora-modules", spec, "--port", "1"]


def test_a_model_folder_after_the_adapters_stays_a_model(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    argv = ["--lora-modules=a=/ad/a", "b=/ad/b", str(model)]
    assert served_names_as_vllm(argv) == ["--lora-modules=a=/ad/a", "--lora-modules", "b=/ad/b", str(model)]


def test_served_model_names_unchanged(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    argv = [str(model), "--served-model-name", "x", "y", "--lora-modules", "a=/ad/a"]
    assert served_names_as_vllm(argv) == [str(model), "--served-model-name", "x", "--served-model-name", "y",
                                          "--lora-modules", "a=/ad/a"]
