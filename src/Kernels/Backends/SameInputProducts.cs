namespace PaliGemma.CpuOnly.Kernels.Backends;

/// <summary>
/// One product of a same-input group on the host (<see cref="IMatrixOperand.TryMultiplySameInputOnHost"/>):
/// the weight, its bias (empty or N floats) and where y[rows, N] goes.
/// </summary>
public readonly struct HostProduct(IMatrixOperand weight, ReadOnlyMemory<float> bias, Memory<float> output)
{
    public IMatrixOperand Weight { get; } = weight;
    public ReadOnlyMemory<float> Bias { get; } = bias;
    public Memory<float> Output { get; } = output;
}

/// <summary>Argument checks shared by the backends' <see cref="IComputeBackend.MatMulSameInput"/>.</summary>
public static class SameInputProducts
{
    /// <summary>Throws unless there is one output per weight, every weight has the same K, and rows is not negative.</summary>
    public static void Check(int rows, ReadOnlySpan<ResidentMatrix> weights, ReadOnlySpan<DeviceSpan> outputs)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        if (weights.Length != outputs.Length)
            throw new ArgumentException($"{weights.Length} weights but {outputs.Length} outputs; each weight needs its own output", nameof(outputs));
        for (int i = 0; i < weights.Length; i++)
        {
            ArgumentNullException.ThrowIfNull(weights[i], nameof(weights));
            if (weights[i].Cols != weights[0].Cols)
                throw new ArgumentException($"weight {i} has K = {weights[i].Cols} but weight 0 has K = {weights[0].Cols}; products of one input share K", nameof(weights));
        }
    }
}
