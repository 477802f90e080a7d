using System.Runtime.CompilerServices;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Tensors;
using static PaliGemma.CpuOnly.Tests.Kernels.KernelTestSupport;

namespace PaliGemma.CpuOnly.Tests.Kernels;

[CollectionDefinition(nameof(KernelThreadingCollection), DisableParallelization = true)]
public sealed class KernelThreadingCollection;

/// <summary>
/// Tests that change the process-wide <see cref="KernelThreading.MaxThreads"/>, count the threads a call uses or the
/// bytes the whole process allocates live in this class, which runs alone (no other test holds the worker pool or allocates meanwhile).
/// </summary>
[Collection(nameof(KernelThreadingCollection))]
public sealed unsafe class KernelThreadingTests
{
    [Fact]
    public void MaxThreads_must_be_positive()
    {
        Assert.Equal("value", Assert.Throws<ArgumentOutOfRangeException>(() => KernelThreading.MaxThreads = 0).ParamName);
        Assert.True(KernelThreading.MaxThreads >= 1);
    }

    [Theory]
    [InlineData(9)]
    [InlineData(40)]   // the packed GEMM
    public void MatMul_single_thread_and_multi_thread_results_agree(int rows)
    {
        const int k = 700, n = 300;
        var random = new Random(5);
        float[] x = RandomFloats(random, rows * k, -1f, 1f);
        var (bytes, _) = EncodeWeights(RandomFloats(random, n * k, -1f, 1f), DType.BF16);
        var serial = new float[rows * n];
        var parallel = new float[rows * n];
        int saved = KernelThreading.MaxThreads;
        fixed (byte* wp = bytes)
        {
            var w = new WeightMatrix(wp, DType.BF16, n, k);
            try
            {
                KernelThreading.MaxThreads = 1;
                MatMul.Multiply(x, rows, w, default, serial);
                KernelThreading.MaxThreads = Math.Max(2, Environment.ProcessorCount);
                MatMul.Multiply(x, rows, w, default, parallel);
            }
            finally
            {
                KernelThreading.MaxThreads = saved;
            }
        }
        // Each output is computed by the same code in the same order whichever thread runs it.
        Assert.Equal(serial, parallel);
    }

    [Fact]
    public void Attention_single_thread_and_multi_thread_results_agree()
    {
        const int queries = 40, keys = 90, heads = 4, kvHeads = 2, d = 24;
        var random = new Random(9);
        float[] q = RandomFloats(random, queries * heads * d, -1f, 1f);
        float[] k = RandomFloats(random, keys * kvHeads * d, -1f, 1f);
        float[] v = RandomFloats(random, keys * kvHeads * d, -1f, 1f);
        int[] start = Enumerable.Range(0, queries).Select(i => i / 3).ToArray();
        int[] end = Enumerable.Range(0, queries).Select(i => keys - queries + i + 1).ToArray();
        float[] serial = new float[queries * heads * d], parallel = new float[queries * heads * d];
        var problem = new AttentionProblem
        {
            Q = q, QRowStride = heads * d, Queries = queries,
            K = k, V = v, KvRowStride = kvHeads * d, Keys = keys,
            Heads = heads, KvHeads = kvHeads, HeadDim = d, Scale = 0.2f, LogitSoftCap = 20f,
            KeyStart = start, KeyEnd = end,
        };
        int saved = KernelThreading.MaxThreads;
        try
        {
            KernelThreading.MaxThreads = 1;
            problem.Output = serial;
            Attention.Forward(problem);
            KernelThreading.MaxThreads = Math.Max(2, Environment.ProcessorCount);
            problem.Output = parallel;
            Attention.Forward(problem);
        }
        finally
        {
            KernelThreading.MaxThreads = saved;
        }
        Assert.Equal(serial, parallel);
    }

    [Fact]
    public void Long_sequences_do_not_allocate_a_score_matrix()
    {
        const int queries = 512, keys = 512, heads = 2, d = 64;
        var random = new Random(3);
        float[] q = RandomFloats(random, queries * heads * d, -1f, 1f);
        float[] kv = RandomFloats(random, keys * heads * d, -1f, 1f);
        int[] start = new int[queries], end = Enumerable.Repeat(keys, queries).ToArray();
        float[] output = new float[queries * heads * d];
        var problem = new AttentionProblem
        {
            Q = q, QRowStride = heads * d, Queries = queries,
            K = kv, V = kv, KvRowStride = heads * d, Keys = keys,
            Heads = heads, KvHeads = heads, HeadDim = d, Scale = 0.125f,
            KeyStart = start, KeyEnd = end, Output = output,
        };
        // On one thread so that the calling thread's allocation counter sees everything the kernel allocates.
        int saved = KernelThreading.MaxThreads;
        long allocated;
        try
        {
            KernelThreading.MaxThreads = 1;
            Attention.Forward(problem);   // warm the scratch pool
            long before = GC.GetAllocatedBytesForCurrentThread();
            Attention.Forward(problem);
            allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        }
        finally
        {
            KernelThreading.MaxThreads = saved;
        }
        // Scratch is kept per thread: a warm call allocates nothing (a single head's score matrix would be 1 MiB).
        Assert.Equal(0, allocated);
        Assert.All(output, value => Assert.True(float.IsFinite(value)));
    }

    private static void WithMaxThreads(int threads, Action action)
    {
        int saved = KernelThreading.MaxThreads;
        try
        {
            KernelThreading.MaxThreads = threads;
            action();
        }
        finally
        {
            KernelThreading.MaxThreads = saved;
        }
    }

    /// <summary>Item i writes a value derived from i and counts its runs.</summary>
    private readonly struct Squares(long[] output, int[] runs) : IWorkItems
    {
        public void Run(int item)
        {
            output[item] = (long)item * item + 7;
            Interlocked.Increment(ref runs[item]);
        }
    }

    [Theory]
    [InlineData(2, 2)]
    [InlineData(2, 1000)]
    [InlineData(3, 17)]
    [InlineData(4, 4097)]
    public void For_runs_every_item_once_with_the_serial_results(int threads, int count)
    {
        long[] serial = new long[count], parallel = new long[count];
        int[] serialRuns = new int[count], parallelRuns = new int[count];
        KernelThreading.For(count, parallel: false, new Squares(serial, serialRuns));
        WithMaxThreads(threads, () =>
        {
            for (int repeat = 0; repeat < 20; repeat++)
            {
                Array.Clear(parallelRuns);
                KernelThreading.For(count, parallel: true, new Squares(parallel, parallelRuns));
                Assert.All(parallelRuns, runs => Assert.Equal(1, runs));
            }
        });
        Assert.All(serialRuns, runs => Assert.Equal(1, runs));
        Assert.Equal(serial, parallel);
    }

    /// <summary>
    /// Every item waits until <c>expected</c> different threads have started one (or a timeout), so a call that can use
    /// that many threads must; records the threads and whether they are background threads.
    /// </summary>
    private sealed class ThreadLog(int expected)
    {
        private readonly object _gate = new();
        public readonly HashSet<int> Threads = [];
        public bool AllBackgroundButCaller = true;
        public int CallerThread = Environment.CurrentManagedThreadId;

        public void Arrive()
        {
            lock (_gate)
            {
                Threads.Add(Environment.CurrentManagedThreadId);
                if (Environment.CurrentManagedThreadId != CallerThread && !Thread.CurrentThread.IsBackground)
                    AllBackgroundButCaller = false;
            }
            var timeout = System.Diagnostics.Stopwatch.StartNew();
            while (timeout.Elapsed < TimeSpan.FromSeconds(10))
            {
                lock (_gate)
                {
                    if (Threads.Count >= expected)
                        return;
                }
                Thread.Sleep(1);
            }
        }
    }

    private readonly struct Logged(ThreadLog log) : IWorkItems
    {
        public void Run(int item) => log.Arrive();
    }

    [Fact]
    public void For_uses_up_to_MaxThreads_background_threads_and_follows_changes()
    {
        foreach (int threads in new[] { 3, 2, 4, 1, 3 })
        {
            var log = new ThreadLog(threads);
            WithMaxThreads(threads, () => KernelThreading.For(threads, parallel: true, new Logged(log)));
            Assert.Equal(threads, log.Threads.Count);
            Assert.Contains(log.CallerThread, log.Threads);
            Assert.True(log.AllBackgroundButCaller, "pool threads must be background threads");

            // More items than threads never bring in more threads than MaxThreads.
            var seen = new System.Collections.Concurrent.ConcurrentDictionary<int, bool>();
            WithMaxThreads(threads, () => KernelThreading.For(64, parallel: true, new Recorded(seen)));
            Assert.InRange(seen.Count, 1, threads);
        }
    }

    private readonly struct Recorded(System.Collections.Concurrent.ConcurrentDictionary<int, bool> seen) : IWorkItems
    {
        public void Run(int item)
        {
            seen[Environment.CurrentManagedThreadId] = true;
            Thread.Sleep(1);
        }
    }

    private sealed class FailureProbe
    {
        public int CallerThread = Environment.CurrentManagedThreadId;
        public volatile bool WorkerFailed;
    }

    /// <summary>Items on pool threads throw; the caller's item waits until one has.</summary>
    private readonly struct FailsOnWorkers(FailureProbe probe) : IWorkItems
    {
        public void Run(int item)
        {
            if (Environment.CurrentManagedThreadId != probe.CallerThread)
            {
                probe.WorkerFailed = true;
                throw new InvalidOperationException($"item {item} failed on a pool thread");
            }
            var timeout = System.Diagnostics.Stopwatch.StartNew();
            while (!probe.WorkerFailed && timeout.Elapsed < TimeSpan.FromSeconds(10))
                Thread.Sleep(1);
        }
    }

    private readonly struct FailsAt(int failing) : IWorkItems
    {
        public void Run(int item)
        {
            if (item == failing)
                throw new ArgumentException($"item {item} failed");
        }
    }

    [Fact]
    public void Exceptions_from_work_items_reach_the_caller_and_the_pool_keeps_working()
    {
        WithMaxThreads(2, () =>
        {
            var probe = new FailureProbe();
            var fromWorker = Assert.Throws<InvalidOperationException>(() => KernelThreading.For(8, parallel: true, new FailsOnWorkers(probe)));
            Assert.Contains("on a pool thread", fromWorker.Message);

            var fromAny = Assert.Throws<ArgumentException>(() => KernelThreading.For(500, parallel: true, new FailsAt(321)));
            Assert.Equal("item 321 failed", fromAny.Message);

            long[] output = new long[300];
            int[] runs = new int[300];
            KernelThreading.For(300, parallel: true, new Squares(output, runs));
            Assert.All(runs, r => Assert.Equal(1, r));
        });
    }

    /// <summary>Each outer item runs an inner parallel batch of its own.</summary>
    private readonly struct Nested(long[][] output, int[][] runs) : IWorkItems
    {
        public void Run(int item) => KernelThreading.For(output[item].Length, parallel: true, new Squares(output[item], runs[item]));
    }

    [Fact]
    public void Calls_from_inside_a_work_item_run_serially_without_deadlock()
    {
        const int outer = 12, inner = 37;
        long[][] output = Enumerable.Range(0, outer).Select(_ => new long[inner]).ToArray();
        int[][] runs = Enumerable.Range(0, outer).Select(_ => new int[inner]).ToArray();
        WithMaxThreads(3, () => KernelThreading.For(outer, parallel: true, new Nested(output, runs)));
        for (int i = 0; i < outer; i++)
        {
            Assert.All(runs[i], r => Assert.Equal(1, r));
            Assert.Equal(Enumerable.Range(0, inner).Select(j => (long)j * j + 7), output[i]);
        }
    }

    [Fact]
    public void Calls_from_several_threads_at_once_all_complete()
    {
        WithMaxThreads(2, () =>
        {
            var tasks = Enumerable.Range(0, 4).Select(t => Task.Run(() =>
            {
                for (int repeat = 0; repeat < 200; repeat++)
                {
                    long[] output = new long[50 + t];
                    int[] runs = new int[50 + t];
                    KernelThreading.For(output.Length, parallel: true, new Squares(output, runs));
                    Assert.All(runs, r => Assert.Equal(1, r));
                }
            })).ToArray();
            Task.WaitAll(tasks);
        });
    }

    /// <summary>
    /// Writes through pointers only, so that the call itself is the only thing that could allocate; with
    /// <paramref name="spin"/> each item takes a few microseconds so that pool threads take part, and items run off the
    /// calling thread are counted.
    /// </summary>
    private readonly struct Fill(float* output, int* itemsOnPool, int callerThread, bool spin) : IWorkItems
    {
        public void Run(int item)
        {
            if (spin)
                Thread.SpinWait(50);
            output[item] = item * 0.5f;
            if (Environment.CurrentManagedThreadId != callerThread)
                Interlocked.Increment(ref *itemsOnPool);
        }
    }

    [Fact]
    public void Warm_parallel_calls_allocate_nothing()
    {
        float[] output = GC.AllocateArray<float>(64, pinned: true);
        int[] itemsOnPool = GC.AllocateArray<int>(1, pinned: true);
        nint outputAddress = (nint)Unsafe.AsPointer(ref output[0]), countAddress = (nint)Unsafe.AsPointer(ref itemsOnPool[0]);
        int caller = Environment.CurrentManagedThreadId;
        WithMaxThreads(2, () =>
        {
            AssertNoAllocation(() => KernelThreading.For(64, parallel: true, new Fill((float*)outputAddress, (int*)countAddress, caller, spin: true)), calls: 300);

            // The whole process too (every thread, whatever it is), over 1000 quick calls. The test runner's threads
            // allocate a little now and then, so the best of a few windows counts; one allocation per call would be 24+ bytes each.
            const int Calls = 1000;
            long fewest = long.MaxValue;
            for (int window = 0; window < 4 && fewest >= Calls; window++)
            {
                long before = GC.GetTotalAllocatedBytes(precise: true);
                for (int i = 0; i < Calls; i++)
                    KernelThreading.For(64, parallel: true, new Fill((float*)outputAddress, (int*)countAddress, caller, spin: false));
                fewest = Math.Min(fewest, GC.GetTotalAllocatedBytes(precise: true) - before);
            }
            Assert.True(fewest < Calls, $"{Calls} calls allocated at least {fewest} bytes in the process");
        });
        Assert.Equal(31.5f, output[63]);
        Assert.True(itemsOnPool[0] > 0, "no item ran on a pool thread, so the test proves nothing about them");
    }

    /// <summary>
    /// Runs the warm-up, then checks that <paramref name="calls"/> calls allocate nothing on the calling thread or on the
    /// pool's threads (each thread's own counter, so the test runner's threads do not blur the count).
    /// </summary>
    private static void AssertNoAllocation(Action call, int calls)
    {
        for (int i = 0; i < 20; i++)
            call();
        // Up to three windows: a one-time event inside the first (the JIT promoting a method to tier 1, a per-thread scratch
        // growing once when a call found the pool busy and ran serially) is not a per-call allocation; one of those would
        // show in every window.
        long caller = 0, pool = 0;
        for (int window = 0; window < 3; window++)
        {
            long callerBefore = GC.GetAllocatedBytesForCurrentThread(), poolBefore = WorkerPool.WorkerAllocatedBytes;
            for (int i = 0; i < calls; i++)
                call();
            caller = GC.GetAllocatedBytesForCurrentThread() - callerBefore;
            pool = WorkerPool.WorkerAllocatedBytes - poolBefore;
            if (caller == 0 && pool == 0)
                return;
        }
        Assert.Fail($"every window of {calls} calls allocated; the last: {caller} bytes on the calling thread and {pool} on the pool's threads");
    }

    [Theory]
    [InlineData(2048, 2048)]
    [InlineData(16384, 2048)]
    [InlineData(2048, 16384)]
    public void Decode_matmul_allocates_nothing(int n, int k)
    {
        float[] x = RandomFloats(new Random(n + k), k, -1f, 1f);
        float[] y = new float[n];
        byte[] weights = new byte[(long)n * k * 2];
        System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ushort>(weights.AsSpan()).Fill(0x3C00);   // bf16 2^-7
        WithMaxThreads(Math.Max(2, Environment.ProcessorCount), () =>
        {
            fixed (byte* wp = weights)
            {
                var w = new WeightMatrix(wp, DType.BF16, n, k);
                AssertNoAllocation(() => MatMul.Multiply(x, 1, w, default, y), calls: n * k > 1 << 24 ? 20 : 200);
            }
        });
        Assert.All(y, value => Assert.True(float.IsFinite(value)));
    }

    [Theory]
    [InlineData(DType.BF16, 0f)]
    [InlineData(DType.F16, 30f)]
    public void Prefill_matmul_allocates_nothing(DType dtype, float softCap)
    {
        const int rows = 70, n = 300, k = 700;   // the packed GEMM, parallel, with tails in every dimension
        var random = new Random(3);
        float[] x = RandomFloats(random, rows * k, -1f, 1f);
        float[] bias = RandomFloats(random, n, -1f, 1f);
        float[] y = new float[rows * n];
        var (bytes, _) = EncodeWeights(RandomFloats(random, n * k, -0.1f, 0.1f), dtype);
        WithMaxThreads(Math.Max(2, Environment.ProcessorCount), () =>
        {
            fixed (byte* wp = bytes)
            {
                var w = new WeightMatrix(wp, dtype, n, k);
                AssertNoAllocation(() => MatMul.Multiply(x, rows, w, bias, y, softCap > 0f ? softCap : 0f), calls: 100);
            }
        });
        Assert.All(y, value => Assert.True(float.IsFinite(value)));
    }

    [Fact]
    public void Quantized_prefill_matmul_allocates_nothing()
    {
        const int rows = 70, n = 300, k = 700;   // nf4 prefill: dequantized into the packed GEMM's panels, in parallel
        float[] x = RandomFloats(new Random(5), rows * k, -1f, 1f);
        float[] y = new float[rows * n];
        float[] weights = RandomFloats(new Random(6), n * k, -0.05f, 0.05f);
        fixed (float* wp = weights)
        {
            var q = PaliGemma.CpuOnly.Quant.Quantizer.Quantize(new WeightMatrix(wp, DType.F32, n, k), PaliGemma.CpuOnly.Quant.QuantFormat.Nf4);
            WithMaxThreads(Math.Max(2, Environment.ProcessorCount),
                () => AssertNoAllocation(() => PaliGemma.CpuOnly.Quant.QuantMatMul.Multiply(x, rows, q, default, y), calls: 100));
        }
        Assert.All(y, value => Assert.True(float.IsFinite(value)));
    }

    [Theory]
    [InlineData("q8")]
    [InlineData("nf4")]
    public void Quantized_decode_matmul_allocates_nothing(string format)
    {
        const int n = 2048, k = 2048;   // above the quantized GEMV's parallel threshold: the work goes to the pool
        float[] x = RandomFloats(new Random(7), k, -1f, 1f);
        float[] y = new float[n];
        float[] weights = RandomFloats(new Random(8), n * k, -0.05f, 0.05f);
        fixed (float* wp = weights)
        {
            var q = PaliGemma.CpuOnly.Quant.Quantizer.Quantize(new WeightMatrix(wp, DType.F32, n, k),
                format == "q8" ? PaliGemma.CpuOnly.Quant.QuantFormat.Q8 : PaliGemma.CpuOnly.Quant.QuantFormat.Nf4);
            WithMaxThreads(Math.Max(2, Environment.ProcessorCount),
                () => AssertNoAllocation(() => PaliGemma.CpuOnly.Quant.QuantMatMul.Multiply(x, 1, q, default, y), calls: 100));
        }
        Assert.All(y, value => Assert.True(float.IsFinite(value)));
    }

    [Theory]
    [InlineData(1024)]
    [InlineData(4096)]
    public void Decode_attention_allocates_nothing(int keys)
    {
        const int heads = 8, d = 256;
        var random = new Random(keys);
        float[] q = RandomFloats(random, heads * d, -1f, 1f);
        float[] k = RandomFloats(random, keys * d, -1f, 1f);
        float[] v = RandomFloats(random, keys * d, -1f, 1f);
        int[] start = [0], end = [keys];
        float[] output = new float[heads * d];
        WithMaxThreads(Math.Max(2, Environment.ProcessorCount), () =>
        {
            AssertNoAllocation(() =>
            {
                var problem = new AttentionProblem
                {
                    Q = q, QRowStride = heads * d, Queries = 1,
                    K = k, V = v, KvRowStride = d, Keys = keys,
                    Heads = heads, KvHeads = 1, HeadDim = d, Scale = 0.0625f,
                    KeyStart = start, KeyEnd = end, Output = output,
                };
                Attention.Forward(problem);
            }, calls: 100);
        });
        Assert.All(output, value => Assert.True(float.IsFinite(value)));
    }
}
