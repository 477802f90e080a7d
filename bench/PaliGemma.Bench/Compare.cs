using System.Diagnostics;
using System.Globalization;
using PaliGemma.Bench.Onnx;
using PaliGemma.Bench.Pairs;
using PaliGemma.CpuOnly.Kernels;

namespace PaliGemma.Bench;

/// <summary>
/// <c>compare [substring...]</c>: each pair built, checked, warmed for half a second per side, then timed alternately with a Stopwatch
/// (at least 3 runs each, more while under a second; calls under 20 ms in alternating bursts of 5 per side, each burst
/// after a 50 ms pause), and one table line printed as soon as it is measured.
/// </summary>
internal static class Compare
{
    private const int MinRuns = 3, MaxRuns = 15, Burst = 5;
    private const double BurstBelowMs = 20;
    private static readonly TimeSpan Budget = TimeSpan.FromSeconds(1);
    private static readonly TimeSpan WarmUpTime = TimeSpan.FromSeconds(0.5);
    // ORT's intra-op threads keep spinning for tens of milliseconds after Run returns (measured: a 2-thread call of ours
    // timed right after ORT's ran at about one thread's speed; 50 ms later, at full speed, and ORT's own times did not
    // change). Each side's burst starts after this pause, so neither is timed beside the other's idle spinning threads.
    internal const int SideSwitchPauseMs = 50;

    public static int Run(string[] filters)
    {
        KernelThreading.MaxThreads = OrtRunner.Threads;
        var names = Catalog.All.Where(n => filters.Length == 0 || filters.Any(f => n.Contains(f, StringComparison.OrdinalIgnoreCase))).ToList();
        if (names.Count == 0)
        {
            Console.Error.WriteLine($"no comparison matches {string.Join(" ", filters)}; names are:\n  " + string.Join("\n  ", Catalog.All));
            return 2;
        }
        Console.WriteLine($"# ours vs ONNX Runtime {typeof(Microsoft.ML.OnnxRuntime.InferenceSession).Assembly.GetName().Version}: " +
                          $"{OrtRunner.Threads} threads each (ORT intra-op, ORT_ENABLE_ALL; KernelThreading.MaxThreads), {Environment.ProcessorCount} CPUs, " +
                          $"load average {BenchStats.LoadAverage()}");
        Console.WriteLine("# rate: GFLOP/s for compute-bound calls, GB/s of memory traffic (weights at their stored width) for GEMV and norms");
        Console.WriteLine($"| {"case",-36} | {"ours ms",9} | {"ORT ms",9} | {"ours/ORT",8} | {"ours rate",12} | {"ORT rate",12} | {"max rel diff",12} | note");
        Console.WriteLine($"|{new string('-', 38)}|{new string('-', 11)}|{new string('-', 11)}|{new string('-', 10)}|{new string('-', 14)}|{new string('-', 14)}|{new string('-', 14)}|------");
        int failures = 0;
        foreach (string name in names)
        {
            try
            {
                using KernelPair pair = Catalog.Create(name);
                pair.RunOurs();
                pair.RunOrt();
                // Until the JIT has tiered the kernels up (30 calls after 100 ms without new methods): timing the
                // first calls of a fresh code path would measure its unoptimised tier-0 code.
                WarmUp(pair.RunOurs);
                WarmUp(pair.RunOrt);
                double warmMs = Time(pair.RunOurs) + Time(pair.RunOrt);
                // Short calls run in bursts per side: both thread pools spin for a while after a call, and a side timed
                // right after the other would share the CPUs with the other's spinning threads; the median drops that first call.
                int burst = warmMs < BurstBelowMs ? Burst : 1;
                var ours = new List<double>();
                var ort = new List<double>();
                var total = Stopwatch.StartNew();
                while (ours.Count < MinRuns || (ours.Count < MaxRuns * burst && total.Elapsed < Budget))
                {
                    Thread.Sleep(SideSwitchPauseMs);
                    for (int i = 0; i < burst; i++)
                        ours.Add(Time(pair.RunOurs));
                    Thread.Sleep(SideSwitchPauseMs);
                    for (int i = 0; i < burst; i++)
                        ort.Add(Time(pair.RunOrt));
                }
                double oursMs = BenchStats.Median(ours), ortMs = BenchStats.Median(ort);
                Console.WriteLine($"| {name,-36} | {oursMs,9:F3} | {ortMs,9:F3} | {oursMs / ortMs,8:F2} | {Rate(pair, pair.OurBytes, oursMs),12} | {Rate(pair, pair.OrtBytes, ortMs),12} | {pair.MaxRelativeDiff,12:0.00e+0} | {pair.Note}");
            }
            catch (Exception e) when (e is InvalidOperationException or Microsoft.ML.OnnxRuntime.OnnxRuntimeException or OutOfMemoryException)
            {
                failures++;
                Console.WriteLine($"| {name,-36} | FAILED: {e.Message}");
            }
        }
        Console.WriteLine($"# load average after: {BenchStats.LoadAverage()}");
        return failures == 0 ? 0 : 1;
    }

    private static void WarmUp(Action action)
    {
        var elapsed = Stopwatch.StartNew();
        while (elapsed.Elapsed < WarmUpTime)
            action();
    }

    private static double Time(Action action)
    {
        long start = Stopwatch.GetTimestamp();
        action();
        return Stopwatch.GetElapsedTime(start).TotalMilliseconds;
    }


    private static string Rate(KernelPair pair, double bytes, double ms)
    {
        // GEMV and norms are bound by memory traffic, the rest by arithmetic.
        bool memoryBound = pair.Flops == 0 || pair.Name.StartsWith("gemv", StringComparison.Ordinal);
        return memoryBound
            ? string.Create(CultureInfo.InvariantCulture, $"{bytes / ms / 1e6:F1} GB/s")
            : string.Create(CultureInfo.InvariantCulture, $"{pair.Flops / ms / 1e6:F1} GFLOP/s");
    }

}
