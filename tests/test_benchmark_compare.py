"""tools/benchmark_compare.py times JAX and PyTorch steps in turns, each turn warmed by one step,
and compares each with the reference."""

import scripts

benchmark_compare = scripts.load("tools/benchmark_compare.py")


def test_runners_take_turns_of_timed_steps_each_after_one_untimed_step():
  calls = []
  runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
  times = benchmark_compare.alternate(runners, steps=5, turn=3)
  # Turns of 3 then 2 timed steps, each turn after its untimed first step.
  assert "".join(calls) == "aaaa" "bbbb" "aaa" "bbb"
  assert {name: len(samples) for name, samples in times.items()} == {"a": 5, "b": 5}
  assert all(wall >= 0 and cpu >= 0 for samples in times.values() for wall, cpu in samples)


def test_each_runner_is_compared_with_the_last(capsys):
  times = {"jax scan": [(2.0, 4.0)], "jax unrolled": [(1.0, 2.0)], "torch": [(1.5, 3.0)]}
  benchmark_compare.print_comparison(times, flops_per_step=1e9, peak_tflops=1.0, unit="images",
                                     per_step=1)
  ratios = [line for line in capsys.readouterr().out.splitlines() if "ratio" in line]
  assert ratios == ["jax scan / torch throughput ratio: 0.75x (by CPU time: 0.75x)",
                    "jax unrolled / torch throughput ratio: 1.50x (by CPU time: 1.50x)"]
