"""The objectives test's settings (tests/test_integration.py) at both output-kl learning rates:
KL to dense on the sotu evaluation split of 8:16 amber on the first four blocks, with no
correction, learnable fitted block by block (block-mse) and end to end (output-kl) at 1e-4 and
1e-3, learn=input (the default), 48 steps on 6 fitted + 2 held-out calibration windows.

    .venv/bin/python scripts/objective_rates.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_integration import model_and_windows

from actsparse import CalibrationSettings, SparsityConfig, evaluate
from actsparse.pieces.corrections import Learnable

FIRST_BLOCKS = (r"layers\.[0-3]\..*_proj$",)


def config(objective: str | None = None) -> SparsityConfig:
    corrections = () if objective is None else (Learnable(objective=objective),)
    return SparsityConfig(pattern="8:16", criterion="amber", include=FIRST_BLOCKS, corrections=corrections)


for name in ("smollm2-135m", "gemma3-270m"):
    model, calibration, windows = model_and_windows(name)
    _, plain, block_mse = evaluate(
        model,
        windows,
        [config(), config("block-mse")],
        calibration,
        calibration_settings=CalibrationSettings(steps=48),  # block-mse's own rate, 5e-3
        progress=False,
    )
    kl = {"none": plain.kl_to_dense, "block-mse": block_mse.kl_to_dense}
    for lr in (1e-4, 1e-3):
        _, output_kl = evaluate(
            model,
            windows,
            [config("output-kl")],
            calibration,
            calibration_settings=CalibrationSettings(steps=48, lr=lr),
            progress=False,
        )
        kl[f"output-kl {lr:g}"] = output_kl.kl_to_dense
    print(f"{name}: " + " / ".join(f"{label} {value:.4f}" for label, value in kl.items()), flush=True)
