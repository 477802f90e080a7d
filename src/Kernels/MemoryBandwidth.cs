using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace PaliGemma.CpuOnly.Kernels;

/// <summary>Result of a <see cref="MemoryBandwidth"/> probe: read bandwidth in GB/s (10⁹ bytes per second).</summary>
public sealed record MemoryBandwidthResult(long BufferBytes, int Threads, string VectorWidth, IReadOnlyList<double> PassGBps)
{
    public double BestGBps => PassGBps.Max();

    public double MedianGBps
    {
        get
        {
            var sorted = PassGBps.Order().ToArray();
            int n = sorted.Length;
            return n % 2 == 1 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
        }
    }
}

/// <summary>A range of readable memory, e.g. one memory-mapped weight tensor.</summary>
public readonly record struct MemoryRegion(nint Address, long Length);

/// <summary>
/// Measures how fast this process can stream memory: the ceiling for bandwidth-bound work such as one-token decode,
/// which reads every weight once per token. Each thread sums its own contiguous share of the bytes with the widest
/// vector loads available; a pass is timed from the moment all threads are released until the last one finishes.
/// </summary>
public static class MemoryBandwidth
{
    private const int Unit = 256;   // bytes one step of the summing loop reads per lane (4 x 64-byte vectors)

    /// <summary>
    /// Streams a fresh anonymous <paramref name="bufferBytes"/> buffer (well above the last-level cache, e.g. 1-2 GiB)
    /// <paramref name="passes"/> times on <paramref name="threads"/> threads (default: <see cref="KernelThreading.MaxThreads"/>),
    /// after one untimed warm-up pass.
    /// </summary>
    public static unsafe MemoryBandwidthResult MeasureRead(long bufferBytes, int threads = 0, int passes = 5)
    {
        const int Alignment = 4096;
        ArgumentOutOfRangeException.ThrowIfLessThan(bufferBytes, (long)Unit);
        ArgumentOutOfRangeException.ThrowIfNegative(threads);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(passes);
        if (threads == 0) threads = KernelThreading.MaxThreads;
        long units = bufferBytes / Unit;
        threads = (int)Math.Min(threads, units);
        long usedBytes = units * Unit;

        byte* buffer = (byte*)NativeMemory.AlignedAlloc((nuint)usedBytes, Alignment);
        try
        {
            // A thread's slice is a whole number of units; first touch from the reading thread places pages near it on NUMA machines.
            var slices = new MemoryRegion[threads][];
            for (int t = 0; t < threads; t++)
            {
                long first = units * t / threads, last = units * (t + 1) / threads;
                slices[t] = [new MemoryRegion((nint)(buffer + first * Unit), (last - first) * Unit)];
            }
            return Measure(slices, usedBytes, passes, fill: true);
        }
        finally
        {
            NativeMemory.AlignedFree(buffer);
        }
    }

    /// <summary>
    /// Streams existing memory, e.g. the memory-mapped weights a decode step reads, so a kernel's speed can be put beside
    /// what those very pages deliver (file pages may be mapped differently from fresh anonymous memory). The regions are
    /// read as one sequence that is cut into <paramref name="threads"/> contiguous shares; nothing is written.
    /// </summary>
    public static MemoryBandwidthResult MeasureRead(IReadOnlyList<MemoryRegion> regions, int threads = 0, int passes = 5)
    {
        ArgumentNullException.ThrowIfNull(regions);
        ArgumentOutOfRangeException.ThrowIfNegative(threads);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(passes);
        long total = 0;
        for (int i = 0; i < regions.Count; i++)
        {
            if (regions[i].Address == 0 || regions[i].Length < 0)
                throw new ArgumentException($"region {i} ({regions[i]}) is not a readable range", nameof(regions));
            total += regions[i].Length;
        }
        if (total < Unit)
            throw new ArgumentException($"the regions hold {total} bytes; at least {Unit} are needed", nameof(regions));
        if (threads == 0) threads = KernelThreading.MaxThreads;
        threads = (int)Math.Min(threads, total / Unit);

        return Measure(Split(regions, total, threads), total, passes, fill: false);
    }

    /// <summary>Cuts the regions, read as one sequence of <paramref name="total"/> bytes, into <paramref name="threads"/> contiguous shares.</summary>
    internal static MemoryRegion[][] Split(IReadOnlyList<MemoryRegion> regions, long total, int threads)
    {
        var slices = new MemoryRegion[threads][];
        int region = 0;
        long offset = 0;   // within regions[region]
        for (int t = 0; t < threads; t++)
        {
            long share = total * (t + 1) / threads - total * t / threads;
            var pieces = new List<MemoryRegion>();
            while (share > 0)
            {
                long take = Math.Min(share, regions[region].Length - offset);
                if (take > 0)
                    pieces.Add(new MemoryRegion(regions[region].Address + (nint)offset, take));
                share -= take;
                offset += take;
                if (offset == regions[region].Length)
                {
                    region++;
                    offset = 0;
                }
            }
            slices[t] = [.. pieces];
        }
        return slices;
    }

    private static unsafe MemoryBandwidthResult Measure(MemoryRegion[][] slices, long totalBytes, int passes, bool fill)
    {
        int threads = slices.Length;
        var sinks = new ulong[threads];
        int totalPasses = passes + 1;
        var starts = new long[totalPasses, threads];
        var ends = new long[totalPasses, threads];
        // Only the readers meet at the barrier and they time themselves: a waiting main thread would compete for cores.
        using var barrier = new Barrier(threads);
        var workers = new Thread[threads];
        for (int t = 0; t < threads; t++)
        {
            int index = t;
            MemoryRegion[] mine = slices[t];
            workers[t] = new Thread(() =>
            {
                if (fill)
                {
                    foreach (var piece in mine)
                        for (long done = 0; done < piece.Length; done += int.MaxValue)
                            new Span<byte>((byte*)piece.Address + done, (int)Math.Min(piece.Length - done, int.MaxValue)).Fill((byte)(index + 1));
                }
                for (int pass = 0; pass < totalPasses; pass++)
                {
                    barrier.SignalAndWait();
                    starts[pass, index] = Stopwatch.GetTimestamp();
                    ulong sum = 0;
                    foreach (var piece in mine)
                        sum ^= SumSlice((byte*)piece.Address, piece.Length);
                    sinks[index] ^= sum;
                    ends[pass, index] = Stopwatch.GetTimestamp();
                }
            })
            { IsBackground = true, Name = $"bandwidth-probe-{t}" };
            workers[t].Start();
        }
        foreach (var worker in workers) worker.Join();
        GC.KeepAlive(sinks);

        // A pass lasts from the first reader starting to the last one finishing; pass 0 is the warm-up.
        var results = new double[passes];
        for (int pass = 1; pass < totalPasses; pass++)
        {
            long start = long.MaxValue, end = long.MinValue;
            for (int t = 0; t < threads; t++)
            {
                start = Math.Min(start, starts[pass, t]);
                end = Math.Max(end, ends[pass, t]);
            }
            double seconds = Math.Max(end - start, 1) / (double)Stopwatch.Frequency;
            results[pass - 1] = totalBytes / seconds / 1e9;
        }
        return new MemoryBandwidthResult(totalBytes, threads, Vector512.IsHardwareAccelerated ? "Vector512" : "Vector256", results);
    }

    /// <summary>
    /// Reads every byte: the slice is cut into four lanes (contiguous quarters) read side by side, 256 bytes of each per
    /// step into independent accumulators. Four sequential streams per core keep more lines in flight than one (measured
    /// on Zen 5: about 5 % more on one core and up to 15 % more on two), so this is the faster plain read, and with it the
    /// honest ceiling: nothing is skipped and nothing is read twice.
    /// </summary>
    internal static unsafe ulong SumSlice(byte* data, long length)
    {
        const int Lanes = 4;
        long laneBytes = length / Lanes / Unit * Unit;
        byte* lane1 = data + laneBytes, lane2 = lane1 + laneBytes, lane3 = lane2 + laneBytes;
        long i = 0;
        ulong total;
        if (Vector512.IsHardwareAccelerated)
        {
            Vector512<ulong> a0 = default, a1 = default, a2 = default, a3 = default;
            for (; i < laneBytes; i += Unit)
            {
                a0 += Sum256(data + i);
                a1 += Sum256(lane1 + i);
                a2 += Sum256(lane2 + i);
                a3 += Sum256(lane3 + i);
            }
            total = Vector512.Sum(a0 + a1 + a2 + a3);
        }
        else
        {
            Vector256<ulong> a0 = default, a1 = default, a2 = default, a3 = default;
            for (; i < laneBytes; i += Unit)
            {
                a0 += Sum256Narrow(data + i);
                a1 += Sum256Narrow(lane1 + i);
                a2 += Sum256Narrow(lane2 + i);
                a3 += Sum256Narrow(lane3 + i);
            }
            total = Vector256.Sum(a0 + a1 + a2 + a3);
        }
        // What the four lanes leave over (under 4 units plus a partial one) is read byte by byte.
        for (long j = Lanes * laneBytes; j < length; j++)
            total += data[j];
        return total;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static unsafe Vector512<ulong> Sum256(byte* p)
    {
        ulong* v = (ulong*)p;
        return (Vector512.Load(v) + Vector512.Load(v + 8)) + (Vector512.Load(v + 16) + Vector512.Load(v + 24));
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static unsafe Vector256<ulong> Sum256Narrow(byte* p)
    {
        ulong* v = (ulong*)p;
        return ((Vector256.Load(v) + Vector256.Load(v + 4)) + (Vector256.Load(v + 8) + Vector256.Load(v + 12)))
             + ((Vector256.Load(v + 16) + Vector256.Load(v + 20)) + (Vector256.Load(v + 24) + Vector256.Load(v + 28)));
    }
}
