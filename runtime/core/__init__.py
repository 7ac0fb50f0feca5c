"""What every stage is built from: processes and devices (`distributed`), the optimizer
(`optim`), backends (`backend`, `deepspeed_backend`), checkpoints (`checkpoint`), the run a
stage belongs to (`run`), the shared loop and its pieces (`loop`), models and adapters
(`model`), loss modules (`losses`), the frozen reference (`reference`), stage outputs
(`outputs`), data (`data`) and the Objective a fixed-data stage hands the loop (`objective`).

Core never imports runtime.stages or the entry modules.
"""

import logging

# bitsandbytes (peft imports it when installed) warns on import, on CPUs with AVX-512 BF16, that
# an optional kernel package is missing, and then uses its own kernel. The line says nothing
# about the run; keep it out of the run's output, where errors must be one clear line.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
