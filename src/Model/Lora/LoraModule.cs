using System.Buffers;
using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Model.Lora;

/// <summary>
/// One adapted dense layer: A [rank, in] and B [out, rank] in fp32 with the layer's scaling. At run time it adds
/// scaling·(x·Aᵀ)·Bᵀ to the base layer's output; merged, it gives W + scaling·B·A.
/// </summary>
public sealed unsafe class LoraModule
{
    // Pinned, so the kernels can read them through WeightMatrix pointers for the module's lifetime.
    private readonly float[] _a, _b;
    private readonly WeightMatrix _aMatrix, _bMatrix;

    internal LoraModule(string name, Linear target, float[] pinnedA, float[] pinnedB, int rank, float scaling)
    {
        Name = name;
        Target = target;
        Rank = rank;
        Scaling = scaling;
        _a = pinnedA;
        _b = pinnedB;
        _aMatrix = new WeightMatrix(Pointer(pinnedA), DType.F32, rank, target.InFeatures);
        _bMatrix = new WeightMatrix(Pointer(pinnedB), DType.F32, target.OutFeatures, rank);
    }

    /// <summary>The module path in the base checkpoint's (hub) names, e.g. <c>language_model.model.layers.0.self_attn.q_proj</c>.</summary>
    public string Name { get; }
    public int Rank { get; }
    /// <summary>lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (per-module overrides applied).</summary>
    public float Scaling { get; }
    public int InFeatures => _aMatrix.Cols;
    public int OutFeatures => _bMatrix.Rows;
    /// <summary>lora_A [rank, in], row-major fp32.</summary>
    public ReadOnlySpan<float> A => _a;
    /// <summary>lora_B [out, rank], row-major fp32.</summary>
    public ReadOnlySpan<float> B => _b;
    /// <summary>The base layer this module adapts.</summary>
    public Linear Layer => Target;
    internal Linear Target { get; }

    /// <summary>y[rows, out] += scaling · (x·Aᵀ)·Bᵀ, the order PEFT evaluates it in. Scratch comes from the shared pool.</summary>
    internal void AddDelta(ReadOnlySpan<float> x, int rows, Span<float> y)
    {
        if (rows == 0) return;
        int outLength = rows * OutFeatures;
        float[] down = ArrayPool<float>.Shared.Rent(rows * Rank);
        float[] up = ArrayPool<float>.Shared.Rent(outLength);
        try
        {
            MatMul.Multiply(x, rows, _aMatrix, default, down);
            MatMul.Multiply(down, rows, _bMatrix, default, up);
            var result = y[..outLength];
            TensorPrimitives.MultiplyAdd(up.AsSpan(0, outLength), Scaling, result, result);
        }
        finally
        {
            ArrayPool<float>.Shared.Return(up);
            ArrayPool<float>.Shared.Return(down);
        }
    }

    /// <summary>
    /// A new pinned fp32 array holding W + scaling·(B·A), W read from <paramref name="baseWeight"/> in its stored dtype;
    /// computed as PEFT's merge does: the product B·A first, then scaled, then added.
    /// </summary>
    internal float[] Merge(in WeightMatrix baseWeight)
    {
        int rows = baseWeight.Rows, cols = baseWeight.Cols, rank = Rank;
        if (rows != OutFeatures || cols != InFeatures)
            throw new ArgumentException($"LoRA module '{Name}' is [{OutFeatures}, {InFeatures}] but the weight is [{rows}, {cols}]", nameof(baseWeight));
        float[] merged = GC.AllocateUninitializedArray<float>(checked(rows * cols), pinned: true);
        Widen(baseWeight, merged);
        var delta = new float[cols];
        for (int n = 0; n < rows; n++)
        {
            Array.Clear(delta);
            for (int j = 0; j < rank; j++)
                TensorPrimitives.MultiplyAdd(_a.AsSpan(j * cols, cols), _b[n * rank + j], delta, delta);
            TensorPrimitives.Multiply(delta, Scaling, delta);
            var row = merged.AsSpan(n * cols, cols);
            TensorPrimitives.Add(row, delta, row);
        }
        return merged;
    }

    private static void Widen(in WeightMatrix w, Span<float> destination)
    {
        int count = w.Rows * w.Cols;
        switch (w.DType)
        {
            case DType.F32:
                new ReadOnlySpan<float>(w.Data, count).CopyTo(destination);
                break;
            case DType.BF16:
                var bf = new ReadOnlySpan<ushort>(w.Data, count);
                for (int i = 0; i < count; i++) destination[i] = BitConverter.Int32BitsToSingle(bf[i] << 16);
                break;
            case DType.F16:
                TensorPrimitives.ConvertToSingle(new ReadOnlySpan<Half>(w.Data, count), destination[..count]);
                break;
            default:
                throw new InvalidDataException($"weight dtype {w.DType} cannot be merged");
        }
    }

    private static float* Pointer(float[] pinned) => (float*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(pinned));
}
