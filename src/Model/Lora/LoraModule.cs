using System.Buffers;
using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Model.Lora;

/// <summary>
/// One adapted dense layer: A [rank, in] and B [out, rank] (kept transposed, [rank, out]) in fp32 with the layer's
/// scaling. At run time it adds scaling·(x·Aᵀ)·Bᵀ to the base layer's output; merged, it gives W + scaling·B·A.
/// </summary>
public sealed unsafe class LoraModule
{
    // A is pinned, so the kernels can read it through a WeightMatrix pointer for the module's lifetime. B is kept
    // transposed: with K = rank (8 or so) a dot-product kernel spends its time on horizontal sums, while rank passes of
    // "up += d_j · Bᵀ[j, :]" are long contiguous vector operations.
    private readonly float[] _a, _bTransposed;
    private readonly WeightMatrix _aMatrix;
    // x·Aᵀ of up to this many floats (32 rows at rank 8) lives on the stack; more comes from the shared pool.
    private const int MaxStackDown = 256;

    internal LoraModule(string name, Linear target, float[] pinnedA, float[] bTransposed, int rank, float scaling)
    {
        if (pinnedA.Length != rank * target.InFeatures || bTransposed.Length != rank * target.OutFeatures)
            throw new ArgumentException($"LoRA module '{name}': A holds {pinnedA.Length} and Bᵀ {bTransposed.Length} floats for rank {rank} and a [{target.OutFeatures}, {target.InFeatures}] layer");
        Name = name;
        Target = target;
        Rank = rank;
        Scaling = scaling;
        _a = pinnedA;
        _bTransposed = bTransposed;
        _aMatrix = new WeightMatrix(Pointer(pinnedA), DType.F32, rank, target.InFeatures);
    }

    /// <summary>The module path in the base checkpoint's (hub) names, e.g. <c>language_model.model.layers.0.self_attn.q_proj</c>.</summary>
    public string Name { get; }
    public int Rank { get; }
    /// <summary>lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (per-module overrides applied).</summary>
    public float Scaling { get; }
    public int InFeatures => _aMatrix.Cols;
    public int OutFeatures => _bTransposed.Length / Rank;
    /// <summary>lora_A [rank, in], row-major fp32.</summary>
    public ReadOnlySpan<float> A => _a;
    /// <summary>lora_B transposed: [rank, out], row-major fp32 (row j is column j of lora_B, so B[n, j] is at j·out + n).</summary>
    public ReadOnlySpan<float> BTransposed => _bTransposed;
    /// <summary>The base layer this module adapts.</summary>
    public Linear Layer => Target;
    internal Linear Target { get; }

    /// <summary>
    /// y[rows, out] += scaling · (x·Aᵀ)·Bᵀ in PEFT's order: the low-rank product first (its sum over the rank in order),
    /// then scaled, then added. One pass over A and one over Bᵀ (split over threads when large); scratch on the stack or
    /// from the shared pool, so a call allocates nothing once the pool is warm.
    /// </summary>
    internal void AddDelta(ReadOnlySpan<float> x, int rows, Span<float> y)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        int rank = Rank, inFeatures = InFeatures, outFeatures = OutFeatures;
        if (x.Length < (long)rows * inFeatures)
            throw new ArgumentException($"LoRA module '{Name}': x holds {x.Length} floats; {rows} rows of {inFeatures} need {(long)rows * inFeatures}", nameof(x));
        if (y.Length < (long)rows * outFeatures)
            throw new ArgumentException($"LoRA module '{Name}': y holds {y.Length} floats; {rows} rows of {outFeatures} need {(long)rows * outFeatures}", nameof(y));
        if (rows == 0) return;

        int downCount = rows * rank;
        float[]? rented = downCount > MaxStackDown ? ArrayPool<float>.Shared.Rent(downCount) : null;
        Span<float> down = rented is null ? stackalloc float[MaxStackDown] : rented;
        try
        {
            fixed (float* xp = x)
            fixed (float* yp = y)
            fixed (float* dp = down)
            fixed (float* ap = _a)
            fixed (float* bp = _bTransposed)
            {
                if (rows >= LowRankKernels.GemmMinRows)
                    MatMul.Multiply(x, rows, _aMatrix, default, down);
                else
                    LowRankKernels.Down(xp, rows, inFeatures, ap, rank, dp);
                LowRankKernels.Up(dp, rows, rank, bp, outFeatures, Scaling, yp);
            }
        }
        finally
        {
            if (rented is not null) ArrayPool<float>.Shared.Return(rented);
        }
    }

    /// <summary>
    /// W + scaling·(B·A) in a new pinned array of <paramref name="baseWeight"/>'s dtype, as PEFT's merge_and_unload keeps
    /// the base dtype: each row is widened to fp32, the product B·A is formed, scaled and added in fp32 (PEFT's order),
    /// then the sum is rounded to the stored dtype (bf16 and f16 to nearest, ties to even). Rows are merged in parallel.
    /// </summary>
    internal MergedWeight Merge(in WeightMatrix baseWeight)
    {
        int rows = baseWeight.Rows, cols = baseWeight.Cols;
        if (rows != OutFeatures || cols != InFeatures)
            throw new ArgumentException($"LoRA module '{Name}' is [{OutFeatures}, {InFeatures}] but the weight is [{rows}, {cols}]", nameof(baseWeight));
        DType dtype = baseWeight.DType;
        int count = checked(rows * cols);
        Array storage = dtype switch
        {
            DType.F32 => GC.AllocateUninitializedArray<float>(count, pinned: true),
            DType.BF16 => GC.AllocateUninitializedArray<ushort>(count, pinned: true),
            DType.F16 => GC.AllocateUninitializedArray<Half>(count, pinned: true),
            _ => throw new InvalidDataException($"'{Name}': weight dtype {dtype} cannot be merged (F32, BF16 or F16)"),
        };
        // Pinned-heap arrays never move, so the address taken here stays valid for the array's lifetime.
        byte* merged = (byte*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(storage));
        byte* source = (byte*)baseWeight.Data;
        int elementSize = dtype.SizeOf();

        const int RowsPerBlock = 32;
        int blocks = (rows + RowsPerBlock - 1) / RowsPerBlock;
        Parallel.For(0, blocks, new ParallelOptions { MaxDegreeOfParallelism = KernelThreading.MaxThreads }, block =>
        {
            float[] row = ArrayPool<float>.Shared.Rent(cols), delta = ArrayPool<float>.Shared.Rent(cols);
            try
            {
                var rowSpan = row.AsSpan(0, cols);
                var deltaSpan = delta.AsSpan(0, cols);
                for (int n = block * RowsPerBlock, end = Math.Min(rows, n + RowsPerBlock); n < end; n++)
                {
                    nint offset = (nint)n * cols * elementSize;
                    Widen(source + offset, dtype, rowSpan);
                    DeltaRow(n, deltaSpan);
                    TensorPrimitives.Add(rowSpan, deltaSpan, rowSpan);
                    Narrow(rowSpan, dtype, merged + offset);
                }
            }
            finally
            {
                ArrayPool<float>.Shared.Return(delta);
                ArrayPool<float>.Shared.Return(row);
            }
        });
        return new MergedWeight(storage, new WeightMatrix(merged, dtype, rows, cols));
    }

    /// <summary>delta = scaling · Σ_j B[n, j]·A[j, :], summed over j in order in fp32: row n of scaling·B·A.</summary>
    private void DeltaRow(int n, Span<float> delta)
    {
        int cols = InFeatures, rank = Rank, outFeatures = OutFeatures;
        delta.Clear();
        for (int j = 0; j < rank; j++)
            TensorPrimitives.MultiplyAdd(_a.AsSpan(j * cols, cols), _bTransposed[j * outFeatures + n], delta, delta);
        TensorPrimitives.Multiply(delta, Scaling, delta);
    }

    /// <summary>Reads destination.Length values stored as <paramref name="dtype"/> at <paramref name="source"/> into fp32.</summary>
    internal static void Widen(byte* source, DType dtype, Span<float> destination)
    {
        int count = destination.Length;
        switch (dtype)
        {
            case DType.F32:
                new ReadOnlySpan<float>(source, count).CopyTo(destination);
                break;
            case DType.BF16:
                var bf = new ReadOnlySpan<ushort>(source, count);
                for (int i = 0; i < count; i++) destination[i] = BitConverter.Int32BitsToSingle(bf[i] << 16);
                break;
            case DType.F16:
                TensorPrimitives.ConvertToSingle(new ReadOnlySpan<Half>(source, count), destination);
                break;
            default:
                throw new InvalidDataException($"dtype {dtype} cannot be widened to fp32 (F32, BF16 or F16)");
        }
    }

    /// <summary>Stores fp32 <paramref name="source"/> as <paramref name="dtype"/> at <paramref name="destination"/>, rounding to nearest even.</summary>
    private static void Narrow(ReadOnlySpan<float> source, DType dtype, byte* destination)
    {
        int count = source.Length;
        switch (dtype)
        {
            case DType.F32:
                source.CopyTo(new Span<float>(destination, count));
                break;
            case DType.BF16:
                Synthesis.SyntheticTensorData.ToBFloat16(source, new Span<ushort>(destination, count));
                break;
            case DType.F16:
                TensorPrimitives.ConvertToHalf(source, new Span<Half>(destination, count));
                break;
            default:
                throw new InvalidDataException($"dtype {dtype} cannot be stored from fp32 (F32, BF16 or F16)");
        }
    }

    private static float* Pointer(float[] pinned) => (float*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(pinned));
}

/// <summary>A merged weight: its private pinned storage (float, ushort or Half elements) and the matrix that reads it.</summary>
internal readonly record struct MergedWeight(Array Storage, WeightMatrix Matrix);
