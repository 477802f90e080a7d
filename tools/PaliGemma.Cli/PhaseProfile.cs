using System.Diagnostics;
using System.Globalization;

namespace PaliGemma.Cli;

/// <summary>
/// <c>bench --profile</c> for a whole phase (vision encode, prefill): the <see cref="ProfilingBackend"/>'s time per kind of
/// operation added up over the measured runs, from the snapshots taken before and after the phase each run. The phase's
/// time is then taken back out of the profiler's running totals, which the decode profile reads.
/// </summary>
internal sealed class PhaseProfile(string phase)
{
    private readonly Dictionary<string, (long Calls, long Ticks)> _totals = [];
    private Dictionary<string, (long Calls, long Ticks)>? _before;
    private int _runs;
    private double _seconds;

    public void Begin(ProfilingBackend profiler)
    {
        _before = profiler.Snapshot();
        profiler.Recording = true;
    }

    public void End(ProfilingBackend profiler, double phaseSeconds)
    {
        profiler.Recording = false;
        foreach (var (name, (calls, ticks)) in profiler.Snapshot())
        {
            var (c0, t0) = _before!.GetValueOrDefault(name);
            if (calls == c0) continue;
            var (c, t) = _totals.GetValueOrDefault(name);
            _totals[name] = (c + calls - c0, t + ticks - t0);
        }
        profiler.Restore(_before!);
        _runs++;
        _seconds += phaseSeconds;
    }

    public void WriteText(TextWriter o)
    {
        if (_runs == 0) return;
        var c = CultureInfo.InvariantCulture;
        double phaseMs = _seconds * 1000 / _runs, inside = 0;
        o.WriteLine(string.Create(c, $"{phase} profile: ms per run, mean of {_runs} runs"));
        foreach (var (name, (calls, ticks)) in _totals.OrderByDescending(kv => kv.Value.Ticks))
        {
            double ms = ticks * 1000.0 / Stopwatch.Frequency / _runs;
            inside += ms;
            o.WriteLine(string.Create(c, $"  {name,-26} {calls / (double)_runs,6:F0} calls {ms,9:F2} ms {100 * ms / phaseMs,5:F1}%"));
        }
        o.WriteLine(string.Create(c, $"  {"outside the backend",-26} {"",12} {phaseMs - inside,9:F2} ms {100 * (phaseMs - inside) / phaseMs,5:F1}%"));
        o.WriteLine(string.Create(c, $"  {phase,-26} {"",12} {phaseMs,9:F2} ms"));
    }
}
