namespace PaliGemma.CpuOnly.Kernels.Backends;

/// <summary>
/// The default backend: host buffers and the library's SIMD kernels, run on the calling thread (and the kernels' own
/// worker threads). Weights stay where they are (usually the mapped checkpoint); uploading one only wraps it.
/// </summary>
public sealed class CpuBackend : IComputeBackend
{
    public static CpuBackend Instance { get; } = new();

    private CpuBackend() { }

    public string Name => $"cpu ({KernelInfo.VectorWidth}, {KernelThreading.MaxThreads} threads)";
    public bool IsHost => true;

    public DeviceBuffer Allocate(long length) => new HostBuffer(this, length);

    public void Write(ReadOnlySpan<float> source, DeviceSpan destination)
    {
        CheckLength(source.Length, destination, nameof(source));
        source.CopyTo(Host(destination));
    }

    public void Read(DeviceSpan source, Span<float> destination)
    {
        CheckLength(destination.Length, source, nameof(destination));
        Host(source).CopyTo(destination);
    }

    public ResidentMatrix Upload(IMatrixOperand weight, ReadOnlySpan<float> bias)
    {
        ArgumentNullException.ThrowIfNull(weight);
        return new HostMatrix(this, weight, bias.ToArray());
    }

    public void MatMul(DeviceSpan x, int rows, ResidentMatrix weight, DeviceSpan y, float outputSoftCap = 0f)
    {
        var host = AsHost(weight);
        host.Source.MultiplyOnHost(Host(x), rows, host.Bias, Host(y), outputSoftCap);
    }

    /// <summary>
    /// Hands the group to the first weight's <see cref="IMatrixOperand.TryMultiplySameInputOnHost"/> (quantized weights
    /// code a token once and share one parallel batch); where it declines, one <see cref="MatMul"/> per weight.
    /// </summary>
    public void MatMulSameInput(DeviceSpan x, int rows, ReadOnlySpan<ResidentMatrix> weights, ReadOnlySpan<DeviceSpan> outputs)
    {
        SameInputProducts.Check(rows, weights, outputs);
        if (weights.Length is >= 2 and <= MaxFusedProducts)
        {
            var buffer = new ProductBuffer();
            Span<HostProduct> products = buffer;
            for (int i = 0; i < weights.Length; i++)
            {
                var host = AsHost(weights[i]);
                var output = outputs[i].Buffer is HostBuffer target && ReferenceEquals(target.Backend, this)
                    ? target.Array.AsMemory((int)outputs[i].Offset, (int)outputs[i].Length)
                    : throw new ArgumentException($"output {i} belongs to '{outputs[i].Buffer.Backend.Name}', not to the CPU backend", nameof(outputs));
                products[i] = new HostProduct(host.Source, host.Bias, output);
            }
            if (products[0].Weight.TryMultiplySameInputOnHost(Host(x), rows, products[..weights.Length]))
                return;
        }
        for (int i = 0; i < weights.Length; i++)
            MatMul(x, rows, weights[i], outputs[i]);
    }

    // Most products one fused call takes (the decoder passes 3 and 2); larger groups run one MatMul each.
    private const int MaxFusedProducts = 8;

    [System.Runtime.CompilerServices.InlineArray(MaxFusedProducts)]
    private struct ProductBuffer
    {
        private HostProduct _first;
    }

    private HostMatrix AsHost(ResidentMatrix weight) =>
        weight as HostMatrix is { } host && ReferenceEquals(host.Backend, this) ? host
            : throw new ArgumentException($"the weight was made resident on '{weight.Backend.Name}', not on the CPU", nameof(weight));

    public void Copy(DeviceSpan source, DeviceSpan destination)
    {
        if (source.Length != destination.Length)
            throw new ArgumentException($"copying {source.Length} floats into a range of {destination.Length}", nameof(destination));
        Host(source).CopyTo(Host(destination));
    }

    public void Add(DeviceSpan a, DeviceSpan b, DeviceSpan destination) =>
        System.Numerics.Tensors.TensorPrimitives.Add(Host(a), Host(b), Host(destination));

    public void Scale(DeviceSpan x, float factor, DeviceSpan destination) =>
        System.Numerics.Tensors.TensorPrimitives.Multiply(Host(x), factor, Host(destination));

    public void GeluTanh(DeviceSpan x, DeviceSpan y) => Activations.GeluTanh(Host(x), Host(y));

    public void GeluTanhMul(DeviceSpan gate, DeviceSpan up, DeviceSpan y) => Activations.GeluTanhMul(Host(gate), Host(up), Host(y));

    public void RmsNorm(DeviceSpan x, DeviceSpan y, int rows, int dim, DeviceSpan weight, float eps, bool unitOffset) =>
        Norms.RmsNorm(Host(x), Host(y), rows, dim, Host(weight), eps, unitOffset);

    public void LayerNorm(DeviceSpan x, DeviceSpan y, int rows, int dim, DeviceSpan gamma, DeviceSpan beta, float eps) =>
        Norms.LayerNorm(Host(x), Host(y), rows, dim, Host(gamma), Host(beta), eps);

    public void Rope(DeviceSpan x, int rows, int heads, int headDim, int rowStride, ReadOnlySpan<int> positions, float theta) =>
        Kernels.Rope.Apply(Host(x), rows, heads, headDim, rowStride, positions, theta);

    public void Attention(scoped in DeviceAttentionProblem p)
    {
        var problem = new AttentionProblem
        {
            Q = Host(p.Q), QRowStride = p.QRowStride, Queries = p.Queries,
            K = Host(p.K), V = Host(p.V), KvRowStride = p.KvRowStride, Keys = p.Keys,
            Heads = p.Heads, KvHeads = p.KvHeads, HeadDim = p.HeadDim, Scale = p.Scale, LogitSoftCap = p.LogitSoftCap,
            KeyStart = p.KeyStart, KeyEnd = p.KeyEnd, KeyValid = p.KeyValid,
            Output = Host(p.Output),
        };
        Kernels.Attention.Forward(problem);
    }

    private Span<float> Host(DeviceSpan span)
    {
        if (span.Buffer is HostBuffer host && ReferenceEquals(host.Backend, this))
            return host.Array.AsSpan((int)span.Offset, (int)span.Length);
        throw new ArgumentException($"the buffer belongs to '{span.Buffer?.Backend.Name ?? "nothing"}', not to the CPU backend");
    }

    private static void CheckLength(long hostLength, DeviceSpan span, string argument)
    {
        if (hostLength != span.Length)
            throw new ArgumentException($"{hostLength} host floats for a buffer range of {span.Length}", argument);
    }

    private sealed class HostMatrix(IComputeBackend backend, IMatrixOperand source, float[] bias) : ResidentMatrix(backend, source, bias.Length)
    {
        public float[] Bias { get; } = bias;
    }
}
