"""``qft init``: write a randomly initialised checkpoint of any registered architecture.

::

    qft init --arch mbt2018-mean --N 64 --M 96 -o runs/init/mbt-64-96.pth
    qft init --arch elic2022-official --N 32 --M 64 --groups 8,8,16,32 --seed 1 -o elic.pth
    qft init --arch cheng2020-attn -o cheng.pth --force          # default N, overwrite
    qft init --arch cca --M 24 --set slices=2,4,6,6,6 --set ae_dim=8,8,16 --set em_dim=8 -o cca.pth

``--set NAME=VALUE`` sets any constructor parameter of the architecture (``qft models``
lists them with their defaults; the model modules document them): an integer, or a
comma-separated list of integers (``--set block_num=1,1,2``).

The file is ``{"state_dict", "arch", "params", "seed"}`` (tensors and plain values,
``update(force=True)`` done), loadable by ``qft.models.load_checkpoint`` and, for the inner
state_dict, by CompressAI's ``from_state_dict``. Parameters not given take the
architecture's defaults (``qft models``); the same seed gives the same file.
"""

from __future__ import annotations

import argparse

from qft.commands._options import add_output_arguments

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, help="architecture id (see `qft models`)")
    parser.add_argument("--N", type=int, help="channels of the transforms and of z")
    parser.add_argument("--M", type=int, help="channels of the latent y")
    parser.add_argument(
        "--groups",
        help="ELIC channel groups, comma-separated, summing to M (e.g. 16,16,32,64,192)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other parameter of the architecture: an integer or comma-separated integers "
        "(repeatable; e.g. --set ae_dim=8,8,16)",
    )
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    add_output_arguments(parser, "checkpoint file to write")


def _parse_set(item: str) -> tuple[str, int | list[int]]:
    """``"NAME=VALUE"`` -> ``(NAME, int)``, or ``(NAME, [int, ...])`` when VALUE has commas."""
    from qft.errors import UserError

    name, sep, value = item.partition("=")
    try:
        if not (sep and name and value):
            raise ValueError
        parsed = [int(v) for v in value.split(",")] if "," in value else int(value)
    except ValueError:
        raise UserError(f"--set takes NAME=VALUE with an integer or comma-separated integers, got {item!r}") from None
    return name.strip(), parsed


def run(args: argparse.Namespace) -> int:
    from qft.errors import UserError
    from qft.models import create_model, get_architecture, save_checkpoint

    arch = get_architecture(args.arch)
    params = {k: v for k, v in (("N", args.N), ("M", args.M)) if v is not None}
    if args.groups is not None:
        try:
            params["groups"] = [int(g) for g in args.groups.split(",")]
        except ValueError:
            raise UserError(f"--groups must be comma-separated integers, got {args.groups!r}") from None
    for item in args.set:
        name, value = _parse_set(item)
        if name in params:
            raise UserError(f"--set {name}: given twice (or also as --{name})")
        params[name] = value
    params = arch.resolve_params(params)
    model = create_model(arch.name, seed=args.seed, **params)
    sha256 = save_checkpoint(
        args.output,
        model,
        arch.name,
        params,
        extra={"seed": args.seed},
        force=args.force,
    )
    print(f"wrote {args.output}: {arch.name} {params} seed {args.seed}, sha256 {sha256[:16]}")
    return 0
