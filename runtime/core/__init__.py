"""What every stage is built from: processes and devices (`distributed`), the optimizer
(`optim`), backends (`backend`, `deepspeed_backend`), checkpoints (`checkpoint`), the run a
stage belongs to (`run`), the shared loop and its pieces (`loop`), models and adapters
(`model`), loss modules (`losses`), the frozen reference (`reference`), stage outputs
(`outputs`), data (`data`) and the Objective a fixed-data stage hands the loop (`objective`).

Core never imports runtime.stages or the entry modules.
"""
