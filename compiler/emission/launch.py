"""Launch artifacts: DeepSpeed configs, the torchrun launcher and the Slurm job.

All are pure functions of the recipe and the runtime config, deterministic, with no hostnames,
absolute paths or secret values: environment variables are named, never copied.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jinja2

from compiler.loading.recipe import Recipe
from runtime.contract.config import RuntimeConfig, StageSpec
from runtime.contract.layout import ds_config_file
from runtime.contract.paths import templates_dir

# Ports derived for "auto" rendezvous: a 2,000-port window above torchrun's default 29500.
PORT_BASE, PORT_SPAN = 29600, 2000


def derived_port(name: str) -> int:
    """A rendezvous port from the build's identity: stable for one recipe, different across recipes,
    so two jobs on one node do not both ask for 29500. (Slurm jobs add their job id at launch.)"""
    return PORT_BASE + int(hashlib.sha256(name.encode()).hexdigest(), 16) % PORT_SPAN


def rendezvous_port(recipe: Recipe) -> int:
    port = recipe.launch.rdzv_port
    return derived_port(recipe.name) if port == "auto" else port


def ds_config(config: RuntimeConfig, stage: StageSpec) -> dict[str, Any]:
    """The DeepSpeed config of one stage; train_batch_size is micro-batch x accumulation x world size."""
    hw = config.hardware
    world = hw.nodes * hw.nproc_per_node
    zero: dict[str, Any] = {"stage": hw.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if hw.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if hw.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": stage.micro_batch_size * stage.grad_accum * world,
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": stage.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": hw.precision == "bf16"},
        "fp16": {"enabled": hw.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": stage.log_every_steps,
        "wall_clock_breakdown": False,
    }


def ds_config_files(config: RuntimeConfig) -> dict[str, bytes]:
    """`ds_config.json` for a one-stage recipe; `ds_config.<stage>.json` per stage otherwise."""
    stages = config.stages
    out = {}
    for stage in stages:
        text = json.dumps(ds_config(config, stage), indent=2, sort_keys=True) + "\n"
        out[ds_config_file(stage.name, len(stages))] = text.encode()
    return out


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir())), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)


def render_launch(config: RuntimeConfig, recipe: Recipe, recipe_file: str) -> str:
    return _environment().get_template("launch.sh.j2").render(
        config=config, recipe_file=recipe_file, port=rendezvous_port(recipe), env_names=recipe.launch.env)


def render_slurm(config: RuntimeConfig, recipe: Recipe, recipe_file: str) -> str:
    return _environment().get_template("job.slurm.j2").render(
        config=config, recipe_file=recipe_file, slurm=recipe.launch.slurm, port_base=PORT_BASE,
        port_span=PORT_SPAN, fixed_port=None if recipe.launch.rdzv_port == "auto" else recipe.launch.rdzv_port,
        env_names=recipe.launch.env)
