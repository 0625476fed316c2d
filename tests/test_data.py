import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from actsparse import ActsparseError
from actsparse.io.text import (
    SOTU_FIRST_EVALUATION_YEAR,
    TextPart,
    calibration_text,
    load_text,
    sotu_addresses,
    sotu_dir,
    token_windows,
)


@pytest.fixture
def word_tokenizer():
    """One token per word of a tiny vocabulary, with BOS id 1."""
    vocab = {
        "<unk>": 0,
        "<s>": 1,
        **{w: i + 2 for i, w in enumerate(["one", "two", "three", "four", "five", "six"])},
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


def test_windows_start_with_bos_and_do_not_overlap(word_tokenizer):
    windows = token_windows(word_tokenizer, "one two three four five six one two", seqlen=4)
    assert windows.tolist() == [[1, 2, 3, 4], [1, 5, 6, 7]]


def test_max_windows(word_tokenizer):
    assert token_windows(word_tokenizer, "one two three four five six", seqlen=3, max_windows=2).shape == (
        2,
        3,
    )


def test_spread_windows_run_evenly_from_the_first_window_to_the_last(word_tokenizer):
    text = "one two three four five six one two three four"  # windows of two words: 12 34 56 12 34
    spread = token_windows(word_tokenizer, text, seqlen=3, max_windows=3, sample="spread")
    assert spread[:, 1:].tolist() == [[2, 3], [6, 7], [4, 5]]  # windows 0, 2 and 4
    first = token_windows(word_tokenizer, text, seqlen=3, max_windows=3)
    assert first[:, 1:].tolist() == [[2, 3], [4, 5], [6, 7]]
    every = token_windows(word_tokenizer, text, seqlen=3, max_windows=9, sample="spread")
    assert every.tolist() == token_windows(word_tokenizer, text, seqlen=3).tolist()


def test_an_unknown_window_sample_names_the_choices(word_tokenizer):
    with pytest.raises(ActsparseError, match="use spread or start"):
        token_windows(word_tokenizer, "one two three", seqlen=3, max_windows=1, sample="middle")


def test_text_too_short_names_the_fix(word_tokenizer):
    with pytest.raises(
        ActsparseError, match="fewer than one window of 16; use a longer text or a smaller --seqlen"
    ):
        token_windows(word_tokenizer, "one two", seqlen=16)


def test_a_local_text_file_splits_into_disjoint_calibration_and_evaluation_parts(tmp_path):
    path = tmp_path / "notes.txt"
    lines = [f"line {i}\n" for i in range(100)]
    path.write_text("".join(lines), encoding="utf-8")
    calibration, evaluation = load_text(str(path), "calibration"), load_text(str(path), "evaluation")
    assert calibration + evaluation == load_text(str(path), "whole") == "".join(lines)
    assert calibration.endswith("\n") and 0.2 < len(calibration) / len(calibration + evaluation) < 0.3
    part = calibration_text(str(path))
    assert part == TextPart(str(path), "calibration") and "first quarter" in part.describe()["part"]


def test_a_separate_calibration_file_is_used_whole_unless_it_is_the_evaluation_text(tmp_path):
    evaluation, other, copy = tmp_path / "eval.txt", tmp_path / "calib.txt", tmp_path / "copy.txt"
    evaluation.write_text("evaluation text\n" * 10)
    other.write_text("calibration text\n" * 10)
    copy.write_text(evaluation.read_text())
    assert calibration_text(str(evaluation), str(other)) == TextPart(str(other), "whole")
    assert calibration_text(str(evaluation), "sotu") == TextPart("sotu", "calibration")
    with pytest.raises(ActsparseError, match="same text"):
        calibration_text(str(evaluation), str(copy))


def test_unknown_text_source():
    with pytest.raises(ActsparseError, match="neither a known dataset"):
        load_text("no-such-file.txt")


def test_sotu_splits_never_overlap_and_cover_every_address():
    calibration, evaluation = sotu_addresses("calibration"), sotu_addresses("evaluation")
    assert not set(calibration) & set(evaluation)
    assert len(calibration) + len(evaluation) == len(list(sotu_dir().glob("*.txt")))
    assert calibration[0].name.startswith("1790") and evaluation[-1].name.startswith("2021")
    assert all(int(f.name[:4]) < SOTU_FIRST_EVALUATION_YEAR for f in calibration)
    assert all(int(f.name[:4]) >= SOTU_FIRST_EVALUATION_YEAR for f in evaluation)
    assert len(load_text("sotu", "evaluation").split()) > 100_000


def test_emails_splits_are_the_two_sets_of_message_bodies_without_headers_or_html(tmp_path):
    import io
    import json
    import tarfile

    from actsparse.io.text import _extract_emails, email_body

    assert email_body("From: a@b\r\nSubject: hi\r\n\r\nHello there.\r\n\r\nBye.\r\n") == "Hello there.\n\nBye."
    messages = {
        "easy-ham-1/00002.bbb.json": "Subject: x\n\nsecond by checksum",
        "easy-ham-1/00001.ccc.json": "Subject: y\n\nlast by checksum",
        "easy-ham-1/00003.aaa.json": "Subject: z\n\nfirst by checksum",
        "easy-ham-2/00001.ddd.json": "Subject: w\n\nevaluation text",
        "easy-ham-2/00002.eee.json": "Content-Type: text/html\n\n<HTML><body>left out</body></HTML>",
        "spam-1/00001.fff.json": "Subject: buy\n\nspam is never used",
    }
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, text in messages.items():
            data = json.dumps({"id": name, "text": text}).encode()
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive.seek(0)
    with tarfile.open(fileobj=archive) as tar:
        _extract_emails(tar, tmp_path)
    assert (tmp_path / "calibration.txt").read_text() == (
        "first by checksum\n\nsecond by checksum\n\nlast by checksum"
    )
    assert (tmp_path / "evaluation.txt").read_text() == "evaluation text"
