using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace PaliGemma.CpuOnly.Kernels;

/// <summary>Result of <see cref="MemoryBandwidth.MeasureRead"/>: read bandwidth in GB/s (10⁹ bytes per second).</summary>
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

/// <summary>
/// Measures how fast this process can stream memory: the ceiling for bandwidth-bound work such as one-token decode,
/// which reads every weight once per token. Each thread sums its own slice of one large buffer with the widest vector
/// loads available; a pass is timed from the moment all threads are released until the last one finishes.
/// </summary>
public static class MemoryBandwidth
{
    /// <summary>
    /// Streams a <paramref name="bufferBytes"/> buffer (well above the last-level cache, e.g. 1-2 GiB) <paramref name="passes"/>
    /// times on <paramref name="threads"/> threads (default: <see cref="KernelThreading.MaxThreads"/>), after one untimed warm-up pass.
    /// </summary>
    public static unsafe MemoryBandwidthResult MeasureRead(long bufferBytes, int threads = 0, int passes = 5)
    {
        const int Alignment = 4096, Unit = 256;   // a thread's slice is a whole number of 4 x 64-byte blocks
        ArgumentOutOfRangeException.ThrowIfLessThan(bufferBytes, (long)Unit);
        ArgumentOutOfRangeException.ThrowIfNegative(threads);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(passes);
        if (threads == 0) threads = KernelThreading.MaxThreads;
        long units = bufferBytes / Unit;
        threads = (int)Math.Min(threads, units);
        long usedBytes = units * Unit;

        byte* buffer = (byte*)NativeMemory.AlignedAlloc((nuint)usedBytes, Alignment);
        var sinks = new ulong[threads];
        int totalPasses = passes + 1;
        var starts = new long[totalPasses, threads];
        var ends = new long[totalPasses, threads];
        // Only the readers meet at the barrier and they time themselves: a waiting main thread would compete for cores.
        using var barrier = new Barrier(threads);
        var workers = new Thread[threads];
        try
        {
            for (int t = 0; t < threads; t++)
            {
                long first = units * t / threads, last = units * (t + 1) / threads;
                int index = t;
                byte* slice = buffer + first * Unit;
                long sliceBytes = (last - first) * Unit;
                workers[t] = new Thread(() =>
                {
                    // First touch from the reading thread places pages near it on NUMA machines.
                    for (long done = 0; done < sliceBytes; done += int.MaxValue)
                        new Span<byte>(slice + done, (int)Math.Min(sliceBytes - done, int.MaxValue)).Fill((byte)(index + 1));
                    for (int pass = 0; pass < totalPasses; pass++)
                    {
                        barrier.SignalAndWait();
                        starts[pass, index] = Stopwatch.GetTimestamp();
                        sinks[index] ^= SumSlice(slice, sliceBytes);
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
                results[pass - 1] = usedBytes / seconds / 1e9;
            }
            return new MemoryBandwidthResult(usedBytes, threads, Vector512.IsHardwareAccelerated ? "Vector512" : "Vector256", results);
        }
        finally
        {
            NativeMemory.AlignedFree(buffer);
        }
    }

    /// <summary>Reads every byte with four independent accumulators, so the loads are never waiting on each other.</summary>
    private static unsafe ulong SumSlice(byte* data, long length)
    {
        if (Vector512.IsHardwareAccelerated)
        {
            Vector512<ulong> a0 = default, a1 = default, a2 = default, a3 = default;
            for (long i = 0; i < length; i += 256)
            {
                ulong* p = (ulong*)(data + i);
                a0 += Vector512.LoadAligned(p);
                a1 += Vector512.LoadAligned(p + 8);
                a2 += Vector512.LoadAligned(p + 16);
                a3 += Vector512.LoadAligned(p + 24);
            }
            return Vector512.Sum(a0 + a1 + a2 + a3);
        }
        else
        {
            Vector256<ulong> a0 = default, a1 = default, a2 = default, a3 = default;
            for (long i = 0; i < length; i += 128)
            {
                ulong* p = (ulong*)(data + i);
                a0 += Vector256.LoadAligned(p);
                a1 += Vector256.LoadAligned(p + 4);
                a2 += Vector256.LoadAligned(p + 8);
                a3 += Vector256.LoadAligned(p + 12);
            }
            return Vector256.Sum(a0 + a1 + a2 + a3);
        }
    }
}
