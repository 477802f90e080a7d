using System.Diagnostics;
using PaliGemma.CpuOnly.Model;

namespace PaliGemma.Cli;

/// <summary>
/// Layer progress on stderr for steps that take a while: silent for the first second of a stage (tiny models never
/// print), then at most two lines a second, and the last layer once something was shown.
/// </summary>
public sealed class StderrProgress : IProgress<InferenceProgress>
{
    private readonly Stopwatch _stageClock = new();
    private string _stage = "";
    private TimeSpan _lastPrint;
    private bool _printed;

    public void Report(InferenceProgress value)
    {
        if (value.Stage != _stage)
        {
            _stage = value.Stage;
            _stageClock.Restart();
            _lastPrint = TimeSpan.Zero;
            _printed = false;
        }
        var now = _stageClock.Elapsed;
        bool last = value.Done == value.Total;
        if ((now >= TimeSpan.FromSeconds(1) && now - _lastPrint >= TimeSpan.FromMilliseconds(500)) || (last && _printed))
        {
            Console.Error.WriteLine($"[paligemma] {value.Stage}: layer {value.Done}/{value.Total} ({now.TotalSeconds:F1} s)");
            _lastPrint = now;
            _printed = true;
        }
    }
}
