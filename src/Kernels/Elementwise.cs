using System.Numerics.Tensors;

namespace PaliGemma.CpuOnly.Kernels;

/// <summary>Element-wise arithmetic on long vectors, cut into chunks that run on the kernel threads.</summary>
public static unsafe class Elementwise
{
    // A multiple of every vector width; below two chunks (a decode step's vectors) the call stays on the calling thread.
    private const int ChunkLength = 1 << 14;

    /// <summary>destination = a + b. a and b must have the same length and destination at least that many floats; destination may be a or b.</summary>
    public static void Add(ReadOnlySpan<float> a, ReadOnlySpan<float> b, Span<float> destination)
    {
        if (b.Length != a.Length)
            throw new ArgumentException($"b holds {b.Length} floats; a has {a.Length}", nameof(b));
        if (destination.Length < a.Length)
            throw new ArgumentException($"destination holds {destination.Length} floats; a has {a.Length}", nameof(destination));
        int chunks = (a.Length + ChunkLength - 1) / ChunkLength;
        if (chunks < 2)
        {
            TensorPrimitives.Add(a, b, destination[..a.Length]);
            return;
        }
        fixed (float* ap = a)
        fixed (float* bp = b)
        fixed (float* dp = destination)
            KernelThreading.For(chunks, true, new AddChunks(ap, bp, dp, a.Length));
    }

    private readonly struct AddChunks(float* a, float* b, float* destination, int length) : IWorkItems
    {
        public void Run(int item)
        {
            int start = item * ChunkLength, count = Math.Min(ChunkLength, length - start);
            TensorPrimitives.Add(new ReadOnlySpan<float>(a + start, count), new ReadOnlySpan<float>(b + start, count), new Span<float>(destination + start, count));
        }
    }
}
