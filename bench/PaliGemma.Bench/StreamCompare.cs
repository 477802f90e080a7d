using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using PaliGemma.Bench.Onnx;
using PaliGemma.Bench.Pairs;
using PaliGemma.CpuOnly.Kernels;

namespace PaliGemma.Bench;

/// <summary>
/// <c>stream [gemv case...] [--rounds R] [--mb M] [--pause MS]</c>: memory streaming side by side in one process. Every
/// round runs, in turn, each GEMV of ours, the same GEMV in ONNX Runtime, and a few plain read patterns over an anonymous
/// M MB buffer (2 threads of their own), each after a pause (default 20 ms; ORT's workers spin on for a while after a
/// call) and as 3 back-to-back calls of which the last 2 are kept. The table
/// gives medians and upper quartiles in GB/s: the host's bandwidth drifts, so only numbers from the same rounds compare.
/// </summary>
internal static unsafe class StreamCompare
{
    public static int Run(string[] args)
    {
        int rounds = 15, pauseMs = 20;
        long megabytes = 256;
        var names = new List<string>();
        for (int i = 0; i < args.Length; i++)
        {
            if (args[i] == "--rounds") rounds = int.Parse(args[++i], CultureInfo.InvariantCulture);
            else if (args[i] == "--pause") pauseMs = int.Parse(args[++i], CultureInfo.InvariantCulture);
            else if (args[i] == "--mb") megabytes = long.Parse(args[++i], CultureInfo.InvariantCulture);
            else names.Add(args[i]);
        }
        if (names.Count == 0)
            names.AddRange(["gemv.gemma.up.2048x16384.f32", "gemv.gemma.up.2048x16384.bf16", "gemv.gemma.down.16384x2048.bf16"]);
        KernelThreading.MaxThreads = OrtRunner.Threads;

        var items = new List<(string Name, double Bytes, Action Call)>();
        var pairs = new List<KernelPair>();
        foreach (string name in names)
        {
            KernelPair pair = Catalog.Create(name);
            pairs.Add(pair);
            items.Add(($"ours {name}", pair.OurBytes, pair.RunOurs));
            items.Add(($"ORT  {name}", pair.OrtBytes, pair.RunOrt));
        }
        long bytes = megabytes << 20;
        byte* buffer = (byte*)NativeMemory.AlignedAlloc((nuint)bytes, 4096);
        new Span<byte>(buffer, (int)Math.Min(bytes, int.MaxValue)).Fill(1);
        for (long i = int.MaxValue; i < bytes; i += 4096) buffer[i] = 1;
        using var readers = new ReaderPair(buffer, bytes);
        foreach (var (label, pattern) in new (string, Pattern)[] { ("plain", Pattern.Plain), ("prefetch t0 8 KB", Pattern.PrefetchT0), ("prefetch nta 256 B", Pattern.PrefetchNta), ("4 streams/thread", Pattern.FourStreams) })
            items.Add(($"read {label}", bytes, () => readers.Run(pattern)));

        Console.WriteLine($"# stream: {rounds} rounds, pause {pauseMs} ms, {OrtRunner.Threads} threads each, read buffer {megabytes} MB, load average {BenchStats.LoadAverage()}");
        var results = items.Select(_ => new List<double>()).ToList();
        foreach (var item in items) { item.Call(); item.Call(); }
        for (int round = 0; round < rounds; round++)
        {
            for (int i = 0; i < items.Count; i++)
            {
                Thread.Sleep(pauseMs);
                items[i].Call();
                for (int c = 0; c < 2; c++)
                {
                    long start = Stopwatch.GetTimestamp();
                    items[i].Call();
                    results[i].Add(items[i].Bytes / Stopwatch.GetElapsedTime(start).TotalSeconds / 1e9);
                }
            }
        }
        Console.WriteLine($"| {"item",-44} | {"median GB/s",11} | {"p75 GB/s",9} |");
        for (int i = 0; i < items.Count; i++)
        {
            var sorted = results[i].Order().ToArray();
            Console.WriteLine($"| {items[i].Name,-44} | {sorted[sorted.Length / 2],11:F1} | {sorted[sorted.Length * 3 / 4],9:F1} |");
        }
        Console.WriteLine($"# load average after: {BenchStats.LoadAverage()}");
        foreach (var pair in pairs) pair.Dispose();
        NativeMemory.AlignedFree(buffer);
        return 0;
    }

    private enum Pattern { Plain, PrefetchT0, PrefetchNta, FourStreams }

    /// <summary>The calling thread and one helper each read a contiguous half of the buffer.</summary>
    private sealed class ReaderPair : IDisposable
    {
        private readonly byte* _buffer;
        private readonly long _bytes;
        private readonly SemaphoreSlim _go = new(0);
        private readonly Thread _helper;
        private volatile bool _stop;
        private volatile int _done;
        private Pattern _pattern;
        public ulong Sink;

        public ReaderPair(byte* buffer, long bytes)
        {
            _buffer = buffer;
            _bytes = bytes;
            _helper = new Thread(() =>
            {
                while (true)
                {
                    _go.Wait();
                    if (_stop) return;
                    Sink ^= Read(1);
                    _done = 1;
                }
            }) { IsBackground = true };
            _helper.Start();
        }

        public void Run(Pattern pattern)
        {
            _pattern = pattern;
            _done = 0;
            _go.Release();
            Sink ^= Read(0);
            while (_done == 0) Thread.SpinWait(4);
        }

        private ulong Read(int half)
        {
            long share = _bytes / 2 / 4096 * 4096;
            byte* start = _buffer + half * share;
            return _pattern switch
            {
                Pattern.Plain => Sum(start, share, 0, false),
                Pattern.PrefetchT0 => Sum(start, share, 8192, false),
                Pattern.PrefetchNta => Sum(start, share, 256, true),
                _ => Streams4(start, share),
            };
        }

        private static ulong Sum(byte* p, long length, int ahead, bool nta)
        {
            Vector512<ulong> a0 = default, a1 = default, a2 = default, a3 = default;
            for (long i = 0; i < length; i += 256)
            {
                if (ahead > 0)
                {
                    byte* q = p + i + ahead;
                    if (nta) { Sse.PrefetchNonTemporal(q); Sse.PrefetchNonTemporal(q + 64); Sse.PrefetchNonTemporal(q + 128); Sse.PrefetchNonTemporal(q + 192); }
                    else { Sse.Prefetch0(q); Sse.Prefetch0(q + 64); Sse.Prefetch0(q + 128); Sse.Prefetch0(q + 192); }
                }
                ulong* v = (ulong*)(p + i);
                a0 += Vector512.Load(v); a1 += Vector512.Load(v + 8); a2 += Vector512.Load(v + 16); a3 += Vector512.Load(v + 24);
            }
            return Vector512.Sum(a0 + a1 + a2 + a3);
        }

        private static ulong Streams4(byte* p, long length)
        {
            long part = length / 4 / 256 * 256;
            Vector512<ulong> a0 = default, a1 = default, a2 = default, a3 = default;
            for (long i = 0; i < part; i += 256)
            {
                for (int s = 0; s < 4; s++)
                {
                    ulong* v = (ulong*)(p + s * part + i);
                    a0 += Vector512.Load(v); a1 += Vector512.Load(v + 8); a2 += Vector512.Load(v + 16); a3 += Vector512.Load(v + 24);
                }
            }
            return Vector512.Sum(a0 + a1 + a2 + a3);
        }

        public void Dispose()
        {
            _stop = true;
            _go.Release();
            _helper.Join();
            _go.Dispose();
        }
    }
}
