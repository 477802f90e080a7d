using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Model;

/// <summary>A dense layer y = x·Wᵀ + b whose weight stays in the mapped checkpoint in its stored dtype.</summary>
public sealed class Linear
{
    private readonly WeightMatrix _weight;
    private readonly float[] _bias;

    public Linear(WeightMatrix weight, float[]? bias)
    {
        _weight = weight;
        _bias = bias ?? [];
    }

    /// <summary>Loads <c>{prefix}.weight</c> [outFeatures, inFeatures] and, when <paramref name="hasBias"/>, <c>{prefix}.bias</c>.</summary>
    public static Linear Load(SafetensorsCheckpoint checkpoint, string prefix, int inFeatures, int outFeatures, bool hasBias)
    {
        var weight = checkpoint.Require(prefix + ".weight", [outFeatures, inFeatures]);
        float[]? bias = hasBias ? checkpoint.Require(prefix + ".bias", [outFeatures]).ToFloatArray() : null;
        return new Linear(WeightMatrix.FromTensor(weight), bias);
    }

    public int InFeatures => _weight.Cols;
    public int OutFeatures => _weight.Rows;
    public WeightMatrix Weight => _weight;

    public void Forward(ReadOnlySpan<float> x, int rows, Span<float> y) => MatMul.Multiply(x, rows, _weight, _bias, y);
}

/// <summary>Norm weights are tiny; they are read once into fp32 arrays (not part of the "no fp32 copy" rule for matrices).</summary>
internal static class SmallTensors
{
    public static float[] Load(SafetensorsCheckpoint checkpoint, string name, int length) =>
        checkpoint.Require(name, [length]).ToFloatArray();
}
