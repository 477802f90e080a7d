using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Tensors;
using static PaliGemma.CpuOnly.Tests.Kernels.KernelTestSupport;

namespace PaliGemma.CpuOnly.Tests.Kernels;

/// <summary>Tests that change the process-wide <see cref="KernelThreading.MaxThreads"/> live in this one class so they never overlap.</summary>
public sealed unsafe class KernelThreadingTests
{
    [Fact]
    public void MaxThreads_must_be_positive()
    {
        Assert.Equal("value", Assert.Throws<ArgumentOutOfRangeException>(() => KernelThreading.MaxThreads = 0).ParamName);
        Assert.True(KernelThreading.MaxThreads >= 1);
    }

    [Fact]
    public void MatMul_single_thread_and_multi_thread_results_agree()
    {
        const int rows = 9, k = 700, n = 300;
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
        // A single head's score matrix would be 1 MiB.
        Assert.True(allocated < (long)queries * keys * sizeof(float) / 16, $"allocated {allocated} bytes");
        Assert.All(output, value => Assert.True(float.IsFinite(value)));
    }
}
