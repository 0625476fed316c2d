import pytest

from actsparse import ActsparseError, load_model


def test_missing_model_is_named(tmp_path):
    with pytest.raises(ActsparseError, match="Model './nowhere' was not found"):
        load_model("./nowhere")


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ActsparseError, match="is a file but not a GGUF model"):
        load_model(str(path))


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ActsparseError, match="has no config.json"):
        load_model(str(tmp_path))


def test_unknown_dtype(tmp_path):
    with pytest.raises(ActsparseError, match="Unknown dtype 'fp8'"):
        load_model("smollm2-135m", dtype="fp8")


def test_local_folder_loads_like_from_pretrained(llama, tmp_path, word_tokenizer_dir):
    llama.save_pretrained(tmp_path)
    for name in word_tokenizer_dir.iterdir():
        (tmp_path / name.name).write_bytes(name.read_bytes())
    model, tokenizer = load_model(str(tmp_path))
    assert type(model) is type(llama) and not model.training
    assert tokenizer.bos_token == "<s>"


@pytest.fixture
def word_tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1}, unk_token="<unk>")),
        bos_token="<s>",
        unk_token="<unk>",
    )
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "flags, expected",
    [({"avx512f", "amx_bf16"}, "bfloat16"), ({"avx512f", "avx512_bf16"}, "bfloat16"), ({"avx2"}, "float32")],
)
def test_dtype_auto_takes_bfloat16_where_the_cpu_computes_it(monkeypatch, flags, expected):
    from actsparse.core.cpu import Cpu
    from actsparse.io import models

    monkeypatch.setattr(models, "this_cpu", lambda: Cpu("Test CPU", frozenset(flags)))
    assert models.resolve_dtype("auto") == expected
    assert models.resolve_dtype("float16") == "float16"
    with pytest.raises(
        ActsparseError, match="Unknown dtype 'half'; choose one of float32, bfloat16, float16 or auto"
    ):
        models.resolve_dtype("half")
