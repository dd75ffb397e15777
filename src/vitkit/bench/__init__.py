"""Benchmarks: throughput, FLOPs, fraction of the hardware's peak and memory, against timm.

    from vitkit.bench import BenchSettings, run_benchmark, format_table
    result = run_benchmark(BenchSettings(model="vit_cifar_patch4_32", batch_size=128))
    print(format_table(result))
"""

from vitkit.bench.flops import count_flops, flop_counter
from vitkit.bench.harness import BenchSettings, PipelineFactory, format_table, run_benchmark, save_json
from vitkit.bench.peak import MatmulPeak
from vitkit.bench.timing import Stats, time_round_robin

__all__ = ["BenchSettings", "MatmulPeak", "PipelineFactory", "Stats", "count_flops", "flop_counter",
           "format_table", "run_benchmark", "save_json", "time_round_robin"]
