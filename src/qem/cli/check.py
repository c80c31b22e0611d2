"""``qem check``: the data curator's pre-flight check of a private data file (qem.check_data).

Lists every private record that qem's private pass would zero (non-finite inputs, a label
outside the model's outputs, a loss or gradient that raises or is not finite), by index and
reason, and releases nothing: no noise is drawn and no budget is spent. Its output describes
private records, for the curator's eyes only, never for publication. Like ``qem finetune``,
the module imports no torch, so that ``--help`` and argument errors answer at once."""

from __future__ import annotations

import argparse

from qem.cli.commands import summary
from qem.cli.common import print_json
from qem.cli.finetune import (
    DATA_FORMS,
    add_model_arguments,
    add_scale_uint8_argument,
    check_data_paths,
    data_reader,
)

SHOWN_RECORDS = 20
"""Records listed in the table (--json lists every one)."""


def add_parser(subparsers) -> None:
    """Register ``qem check``."""
    parser = subparsers.add_parser(
        "check",
        help=summary("check"),
        description=(
            "List the private records that qem's private pass would treat as invalid and zero "
            "(invalid_records='zero'), by index and reason, without releasing anything: no "
            "noise is drawn and no budget is spent. Fix the data pipeline before fine-tuning. "
            "The list describes private records: it is for you, who hold the data, never for "
            f"publication. Exit status 1 when a record is invalid. {DATA_FORMS}"
        ),
    )
    add_model_arguments(parser, required=True)
    data = parser.add_argument_group("data")
    data.add_argument("--private", required=True, help="the private data to check")
    add_scale_uint8_argument(data)
    parser.add_argument("--batch-size", type=int, default=256, help="records per batch")
    parser.add_argument("--json", action="store_true", help="print every invalid record as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Check the data file exists, load the model and the data, and list the invalid records;
    0 when there are none, 1 otherwise."""
    check_data_paths(args, ("private",))
    from qem.checks import check_count
    from qem.cli.user_model import load_model
    from qem.data_check import check_data
    from qem.losses import LOSSES

    batch_size = check_count("--batch-size", args.batch_size)
    model = load_model(args.model, args.state_dict)
    private = data_reader(args, model)(args.private, "--private", addressable=True)
    invalid = check_data(model, LOSSES[args.loss], private, batch_size=batch_size)
    if args.json:
        print_json({"invalid": [{"index": r.index, "reason": r.reason} for r in invalid]})
    elif not invalid:
        print(f"qem check: every record of {args.private} is valid.")
    else:
        print(f"qem check: {len(invalid)} invalid record(s) in {args.private} (for you only):")
        for record in invalid[:SHOWN_RECORDS]:
            print(f"  record {record.index}: {record.reason}")
        if len(invalid) > SHOWN_RECORDS:
            print(f"  ... and {len(invalid) - SHOWN_RECORDS} more (--json lists all)")
    return 1 if invalid else 0
