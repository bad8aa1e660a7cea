"""tools/benchmark_compare.py times JAX and PyTorch steps in turns, each turn warmed by one step."""

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
