"""`lorakit inspect DIR`: what an adapter directory holds."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="print an adapter's config, size and per-module norms",
                       description="Print an adapter's config, parameter count, size on disk and "
                                   "per-module norms (||A||, ||B||, ||ΔW|| = scale·||B A||, Frobenius), "
                                   "the variant (lora, dora) and the initialisation.")
    p.add_argument("directory", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--serving", action="store_true",
                   help="also list what would stop the adapter from loading in vLLM, SGLang or LoRAX "
                        "(see lorakit/serving.py)")
    p.set_defaults(run=run)


def run(args) -> int:
    from lorakit.adapter_io import adapter_report

    report = adapter_report(args.directory)
    if args.serving:
        from lorakit.serving import serving_problems

        report["serving"] = serving_problems(report["config"])
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    c = report["config"]
    print(f"adapter: {Path(args.directory)}")
    print(f"  {'variant':<24} {report['variant']}" + (f" ({report['magnitude_vectors']} magnitude vectors)"
                                                      if report["variant"] == "dora" else ""))
    print(f"  {'initialisation':<24} {report['init']}")
    for key in ("base_model_name_or_path", "task_type", "r", "lora_alpha", "use_rslora", "lora_dropout",
                "target_modules", "modules_to_save", "bias"):
        print(f"  {key:<24} {c.get(key)}")
    print(f"  {'parameters':<24} {report['parameters']:,}")
    print(f"  {'size on disk':<24} {report['bytes'] / 2**20:.2f} MiB ({report['bytes']:,} bytes)")
    print(f"\n  {'module':<56} {'r':>4} {'scale':>8} {'||A||':>9} {'||B||':>9} {'||ΔW||':>9}")
    for m in report["modules"]:
        print(f"  {m['module']:<56} {m['r']:>4} {m['scale']:>8.3g} {m['norm_A']:>9.4f} "
              f"{m['norm_B']:>9.4f} {m['norm_delta']:>9.4f}")
    if args.serving:
        from lorakit.serving import SERVERS

        print(f"\n  serving ({', '.join(SERVERS)}): " + ("nothing known to stop it" if not report["serving"] else ""))
        for line in report["serving"]:
            print(f"    {line}")
    return 0
