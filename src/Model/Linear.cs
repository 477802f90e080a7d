using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Kernels.Backends;
using PaliGemma.CpuOnly.Model.Lora;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Model;

/// <summary>A dense layer y = x·Wᵀ + b whose weight stays in the mapped checkpoint in its stored dtype.</summary>
public sealed class Linear
{
    private WeightMatrix _weight;
    private readonly float[] _bias;
    // A merged LoRA weight: a private pinned array in the checkpoint's dtype that _weight points into (null while the checkpoint's is used).
    private Array? _ownedWeight;
    // The weight in q8/nf4 blocks (mapped from a quantized checkpoint or quantized at load); when set, _weight is unused.
    private QuantizedMatrix? _quantized;
    // The weight (and bias) as the compute backend holds it; made by Bind once the weight is final (after merging/quantizing).
    private ResidentMatrix? _resident;

    public Linear(WeightMatrix weight, float[]? bias) : this(weight, bias, "") { }

    public Linear(WeightMatrix weight, float[]? bias, string name)
    {
        _weight = weight;
        _bias = bias ?? [];
        Name = name;
    }

    /// <summary>Loads <c>{prefix}.weight</c> [outFeatures, inFeatures] and, when <paramref name="hasBias"/>, <c>{prefix}.bias</c>.</summary>
    public static Linear Load(SafetensorsCheckpoint checkpoint, string prefix, int inFeatures, int outFeatures, bool hasBias)
    {
        float[]? bias = hasBias ? checkpoint.Require(prefix + ".bias", [outFeatures]).ToFloatArray() : null;
        if (!checkpoint.Contains(prefix + ".weight") && QuantizedCheckpoint.TryOpen(checkpoint, prefix + ".weight", outFeatures, inFeatures) is { } quantized)
            return new Linear(default, bias, prefix) { _quantized = quantized };
        var weight = checkpoint.Require(prefix + ".weight", [outFeatures, inFeatures]);
        return new Linear(WeightMatrix.FromTensor(weight), bias, prefix);
    }

    public int InFeatures => _quantized?.Cols ?? _weight.Cols;
    public int OutFeatures => _quantized?.Rows ?? _weight.Rows;
    /// <summary>The q8/nf4 weight when the layer is quantized (then <see cref="Weight"/> is not used), else null.</summary>
    public QuantizedMatrix? Quantized => _quantized;
    public WeightMatrix Weight => _quantized is null ? _weight
        : throw new NotSupportedException($"'{Name}' is quantized ({_quantized.Format.Name()}); it has no float weight matrix");
    /// <summary>The module path in the hub checkpoint (the weight's name without <c>.weight</c>), empty when built directly.</summary>
    public string Name { get; }
    /// <summary>True when a LoRA adapter was merged at load into a private copy of the weight (in the checkpoint's dtype).</summary>
    public bool HasMergedWeight => _ownedWeight is not null;

    /// <summary>The weight as seen by the kernels: the float matrix or the quantized one.</summary>
    public IMatrixOperand Operand => _quantized is not null ? _quantized : (IMatrixOperand)_weight;

    /// <summary>Makes the current weight and bias resident on <paramref name="backend"/> (again after a merge or quantization).</summary>
    internal void Bind(IComputeBackend backend)
    {
        var previous = _resident;
        _resident = backend.Upload(Operand, _bias);
        previous?.Dispose();
    }

    /// <summary>y = x·Wᵀ + b on the backend the layer is bound to, plus the low-rank term of <paramref name="adapter"/> when it adapts this layer.</summary>
    internal void Forward(IComputeBackend backend, DeviceSpan x, int rows, DeviceSpan y, LoraAdapter? adapter)
    {
        backend.MatMul(x, rows, ResidentOn(backend), y);
        AddAdapterDelta(backend, x, rows, y, adapter);
    }

    /// <summary>
    /// outputs[i] = x·W_iᵀ + b_i for layers that read the same x (a decoder layer's q/k/v, its gate/up), as one
    /// <see cref="IComputeBackend.MatMulSameInput"/>; then each layer's LoRA term. Bit-identical to one
    /// <see cref="Forward(IComputeBackend, DeviceSpan, int, DeviceSpan, LoraAdapter?)"/> per layer: the products only
    /// read x, and each adapter term only reads x and adds to its own output.
    /// </summary>
    internal static void ForwardSameInput(IComputeBackend backend, DeviceSpan x, int rows, ReadOnlySpan<Linear> layers, ReadOnlySpan<DeviceSpan> outputs, LoraAdapter? adapter)
    {
        if (layers.Length != outputs.Length)
            throw new ArgumentException($"{layers.Length} layers but {outputs.Length} outputs", nameof(outputs));
        if (layers.Length > SameInputGroup.Length)
        {
            for (int i = 0; i < layers.Length; i++)
                layers[i].Forward(backend, x, rows, outputs[i], adapter);
            return;
        }
        var group = new SameInputGroup();
        Span<ResidentMatrix> weights = group;
        for (int i = 0; i < layers.Length; i++)
            weights[i] = layers[i].ResidentOn(backend);
        backend.MatMulSameInput(x, rows, weights[..layers.Length], outputs);
        for (int i = 0; i < layers.Length; i++)
            layers[i].AddAdapterDelta(backend, x, rows, outputs[i], adapter);
    }

    [System.Runtime.CompilerServices.InlineArray(Length)]
    private struct SameInputGroup
    {
        public const int Length = 4;
        private ResidentMatrix _first;
    }

    private ResidentMatrix ResidentOn(IComputeBackend backend) =>
        _resident is { } r && ReferenceEquals(r.Backend, backend) ? r
            : throw new InvalidOperationException($"'{Name}' is not resident on '{backend.Name}'");

    private void AddAdapterDelta(IComputeBackend backend, DeviceSpan x, int rows, DeviceSpan y, LoraAdapter? adapter)
    {
        if (adapter is null || AdapterSlot < 0 || adapter.ModuleAt(AdapterSlot) is not { } module)
            return;
        if (!backend.IsHost)
            throw new NotSupportedException($"run-time LoRA adapter '{adapter.Directory}' needs the CPU backend; on '{backend.Name}' merge it at load (PaliGemmaLoadOptions.MergeAdapterDirectory, --merge-adapter)");
        module.AddDelta(x.HostSpan[..(rows * InFeatures)], rows, y.HostSpan[..(rows * OutFeatures)]);
    }

    /// <summary>Index of this layer among the model's adaptable layers; LoRA adapters look their modules up by it (-1: not adaptable).</summary>
    internal int AdapterSlot { get; set; } = -1;

    public void Forward(ReadOnlySpan<float> x, int rows, Span<float> y)
    {
        if (_quantized is not null)
            QuantMatMul.Multiply(x, rows, _quantized, _bias, y);
        else
            MatMul.Multiply(x, rows, _weight, _bias, y);
    }

    /// <summary>y = x·Wᵀ + b, plus the low-rank term of <paramref name="adapter"/> when it adapts this layer.</summary>
    public void Forward(ReadOnlySpan<float> x, int rows, Span<float> y, LoraAdapter? adapter)
    {
        Forward(x, rows, y);
        if (adapter is not null && AdapterSlot >= 0) adapter.ModuleAt(AdapterSlot)?.AddDelta(x, rows, y);
    }

    /// <summary>Points the layer at a merged weight of the same shape and dtype; only called while the model is being loaded.</summary>
    internal void UseMergedWeight(MergedWeight merged)
    {
        if (_quantized is not null)
            throw new NotSupportedException($"'{Name}' is quantized ({_quantized.Format.Name()}); merge LoRA adapters into the float checkpoint before quantizing");
        var w = merged.Matrix;
        if (w.Rows != _weight.Rows || w.Cols != _weight.Cols || w.DType != _weight.DType)
            throw new ArgumentException($"merged weight for '{Name}' is {w}, the layer's is {_weight}", nameof(merged));
        // The storage lives on the pinned object heap, so the pointer stays valid for as long as this layer holds it.
        _weight = w;
        _ownedWeight = merged.Storage;
    }

    /// <summary>Replaces the float weight by a quantized copy of it (load-time quantization; the float weight is no longer read).</summary>
    internal void QuantizeWeight(QuantFormat format, ScaleSelection scales)
    {
        if (_quantized is not null)
        {
            if (_quantized.Format != format)
                throw new InvalidOperationException($"'{Name}' is already stored as {_quantized.Format.Name()}; it cannot be requantized to {format.Name()}");
            return;
        }
        _quantized = Quantizer.Quantize(_weight, format, scales);
        _weight = default;
        _ownedWeight = null;
    }
}

/// <summary>Norm weights are tiny; they are read once into fp32 arrays (not part of the "no fp32 copy" rule for matrices).</summary>
internal static class SmallTensors
{
    public static float[] Load(SafetensorsCheckpoint checkpoint, string name, int length) =>
        checkpoint.Require(name, [length]).ToFloatArray();

    /// <summary>A backend copy of a small fp32 vector (norm weights, biases, position embeddings), made once at load.</summary>
    public static DeviceBuffer Upload(IComputeBackend backend, float[] values)
    {
        var buffer = backend.Allocate(values.Length);
        backend.Write(values, buffer.Span);
        return buffer;
    }
}
