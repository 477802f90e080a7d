using System.Numerics.Tensors;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Kernels.Backends;
using PaliGemma.CpuOnly.Model.Lora;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Model;

/// <summary>
/// SigLIP vision tower as PaliGemma uses it: 14-px patch embedding (a convolution done as one GEMM over unfolded patches),
/// learned position embeddings, pre-LayerNorm transformer layers with GELU-tanh MLPs, a final LayerNorm, no pooling head.
/// </summary>
public sealed class SigLipVisionTower
{
    private const string Prefix = "vision_tower.vision_model.";

    private readonly VisionConfig _config;
    private readonly Linear _patchEmbedding;      // conv weight [hidden, 3, P, P] viewed as [hidden, 3·P·P]
    private readonly float[] _positionEmbedding;  // [patches, hidden]
    private readonly EncoderLayer[] _layers;
    private readonly float[] _postNormWeight, _postNormBias;
    private IComputeBackend _backend = CpuBackend.Instance;
    private ResidentNorms[] _residentNorms = [];
    private DeviceBuffer? _residentPositions, _residentPostNormWeight, _residentPostNormBias;

    private sealed record EncoderLayer(
        float[] Norm1Weight, float[] Norm1Bias, Linear Q, Linear K, Linear V, Linear Out,
        float[] Norm2Weight, float[] Norm2Bias, Linear Fc1, Linear Fc2);

    public SigLipVisionTower(VisionConfig config, SafetensorsCheckpoint checkpoint)
    {
        _config = config;
        int d = config.HiddenSize, p = config.PatchSize, patches = config.PatchesPerSide * config.PatchesPerSide;
        var conv = checkpoint.Require(Prefix + "embeddings.patch_embedding.weight", [d, config.NumChannels, p, p]);
        var convBias = checkpoint.Require(Prefix + "embeddings.patch_embedding.bias", [d]).ToFloatArray();
        _patchEmbedding = new Linear(WeightMatrix.FromTensor(conv), convBias);
        _positionEmbedding = checkpoint.Require(Prefix + "embeddings.position_embedding.weight", [patches, d]).ToFloatArray();

        _layers = new EncoderLayer[config.NumHiddenLayers];
        for (int i = 0; i < _layers.Length; i++)
        {
            string l = $"{Prefix}encoder.layers.{i}.";
            _layers[i] = new EncoderLayer(
                SmallTensors.Load(checkpoint, l + "layer_norm1.weight", d),
                SmallTensors.Load(checkpoint, l + "layer_norm1.bias", d),
                Linear.Load(checkpoint, l + "self_attn.q_proj", d, d, hasBias: true),
                Linear.Load(checkpoint, l + "self_attn.k_proj", d, d, hasBias: true),
                Linear.Load(checkpoint, l + "self_attn.v_proj", d, d, hasBias: true),
                Linear.Load(checkpoint, l + "self_attn.out_proj", d, d, hasBias: true),
                SmallTensors.Load(checkpoint, l + "layer_norm2.weight", d),
                SmallTensors.Load(checkpoint, l + "layer_norm2.bias", d),
                Linear.Load(checkpoint, l + "mlp.fc1", d, config.IntermediateSize, hasBias: true),
                Linear.Load(checkpoint, l + "mlp.fc2", config.IntermediateSize, d, hasBias: true));
        }
        _postNormWeight = SmallTensors.Load(checkpoint, Prefix + "post_layernorm.weight", d);
        _postNormBias = SmallTensors.Load(checkpoint, Prefix + "post_layernorm.bias", d);
        Bind(CpuBackend.Instance);
    }

    public VisionConfig Config => _config;
    public int TokensPerImage => _config.PatchesPerSide * _config.PatchesPerSide;

    /// <summary>The encoder's dense layers (LoRA targets), layer by layer: q, k, v, out, fc1, fc2.</summary>
    internal IEnumerable<Linear> Linears =>
        _layers.SelectMany(static l => new[] { l.Q, l.K, l.V, l.Out, l.Fc1, l.Fc2 });

    /// <summary>
    /// Encodes <paramref name="images"/> images given as pixel values [B, 3, S, S] into the last hidden state
    /// [B, tokens, hidden] (after the post LayerNorm), written to <paramref name="output"/>.
    /// </summary>
    /// <param name="adapter">A run-time LoRA adapter whose low-rank terms are added to the layers it adapts, or null.</param>
    public void Encode(ReadOnlySpan<float> pixelValues, int images, Span<float> output, CancellationToken cancellationToken = default,
        LoraAdapter? adapter = null, IProgress<InferenceProgress>? progress = null)
    {
        int s = _config.ImageSize, tokens = TokensPerImage, d = _config.HiddenSize;
        if (pixelValues.Length != images * 3 * s * s)
            throw new ArgumentException($"pixel values hold {pixelValues.Length} floats, {images} image(s) of 3x{s}x{s} need {images * 3 * s * s}", nameof(pixelValues));
        if (output.Length != images * tokens * d)
            throw new ArgumentException($"output holds {output.Length} floats, {images * tokens * d} needed", nameof(output));
        if (adapter is not null && !ReferenceEquals(adapter.BaseModel.Vision, this))
            throw new ArgumentException($"LoRA adapter '{adapter.Directory}' was loaded for another model", nameof(adapter));

        int rows = images * tokens, inner = _config.IntermediateSize;
        var backend = _backend;
        // The buffers of the last call with as many images are reused (every one is fully written before it is read);
        // a call running beside another one on a second thread makes its own.
        var ws = Interlocked.Exchange(ref _spareWorkspace, null);
        if (ws is null || ws.Rows != rows || !ReferenceEquals(ws.Backend, backend))
        {
            ws?.Dispose();
            ws = new EncoderWorkspace(backend, rows, 3 * _config.PatchSize * _config.PatchSize, d, inner);
        }
        try
        {
            Encode(pixelValues, images, output, ws, cancellationToken, adapter, progress);
        }
        finally
        {
            if (Interlocked.CompareExchange(ref _spareWorkspace, ws, null) is not null)
                ws.Dispose();
        }
    }

    private EncoderWorkspace? _spareWorkspace;

    private sealed class EncoderWorkspace : IDisposable
    {
        private readonly DeviceBuffer[] _buffers;

        public EncoderWorkspace(IComputeBackend backend, int rows, int patchLength, int d, int inner)
        {
            Backend = backend;
            Rows = rows;
            Patches = new float[rows * patchLength];
            _buffers = [backend.Allocate(Patches.Length), backend.Allocate((long)rows * d), backend.Allocate((long)rows * d),
                backend.Allocate((long)rows * d), backend.Allocate((long)rows * d), backend.Allocate((long)rows * d),
                backend.Allocate((long)rows * d), backend.Allocate((long)rows * inner)];
        }

        public IComputeBackend Backend { get; }
        public int Rows { get; }
        public float[] Patches { get; }
        public DeviceSpan PatchRows => _buffers[0].Span;
        public DeviceSpan H => _buffers[1].Span;
        public DeviceSpan Normed => _buffers[2].Span;
        public DeviceSpan Q => _buffers[3].Span;
        public DeviceSpan K => _buffers[4].Span;
        public DeviceSpan V => _buffers[5].Span;
        public DeviceSpan Attention => _buffers[6].Span;
        public DeviceSpan Mlp => _buffers[7].Span;

        public void Dispose()
        {
            foreach (var buffer in _buffers)
                buffer.Dispose();
        }
    }

    private void Encode(ReadOnlySpan<float> pixelValues, int images, Span<float> output, EncoderWorkspace ws, CancellationToken cancellationToken,
        LoraAdapter? adapter, IProgress<InferenceProgress>? progress)
    {
        int tokens = TokensPerImage, d = _config.HiddenSize, rows = images * tokens;
        var backend = ws.Backend;
        float[] patches = ws.Patches;
        Unfold(pixelValues, images, patches);
        DeviceSpan h = ws.H, normed = ws.Normed, q = ws.Q, k = ws.K, v = ws.V, attn = ws.Attention, mlp = ws.Mlp;

        backend.Write(patches, ws.PatchRows);
        _patchEmbedding.Forward(backend, ws.PatchRows, rows, h, null);
        for (int b = 0; b < images; b++)
            backend.Add(h.Slice(b * tokens * d, tokens * d), _residentPositions!.Span, h.Slice(b * tokens * d, tokens * d));

        int heads = _config.NumAttentionHeads, headDim = _config.HeadDim;
        int[] keyStart = new int[tokens], keyEnd = new int[tokens];
        Array.Fill(keyEnd, tokens);
        float scale = 1f / MathF.Sqrt(headDim);
        float eps = _config.LayerNormEps;

        for (int li = 0; li < _layers.Length; li++)
        {
            cancellationToken.ThrowIfCancellationRequested();
            var layer = _layers[li];
            var norms = _residentNorms[li];
            backend.LayerNorm(h, normed, rows, d, norms.Norm1Weight.Span, norms.Norm1Bias.Span, eps);
            layer.Q.Forward(backend, normed, rows, q, adapter);
            layer.K.Forward(backend, normed, rows, k, adapter);
            layer.V.Forward(backend, normed, rows, v, adapter);
            for (int b = 0; b < images; b++)
            {
                int off = b * tokens * d;
                var problem = new DeviceAttentionProblem
                {
                    Q = q.Slice(off, tokens * d), QRowStride = d, Queries = tokens,
                    K = k.Slice(off, tokens * d), V = v.Slice(off, tokens * d), KvRowStride = d, Keys = tokens,
                    Heads = heads, KvHeads = heads, HeadDim = headDim, Scale = scale,
                    KeyStart = keyStart, KeyEnd = keyEnd,
                    Output = attn.Slice(off, tokens * d),
                };
                backend.Attention(problem);
            }
            layer.Out.Forward(backend, attn, rows, normed, adapter);
            backend.Add(h, normed, h);

            backend.LayerNorm(h, normed, rows, d, norms.Norm2Weight.Span, norms.Norm2Bias.Span, eps);
            layer.Fc1.Forward(backend, normed, rows, mlp, adapter);
            backend.GeluTanh(mlp, mlp);
            layer.Fc2.Forward(backend, mlp, rows, normed, adapter);
            backend.Add(h, normed, h);
            progress?.Report(new InferenceProgress("vision", li + 1, _layers.Length));
        }
        backend.LayerNorm(h, h, rows, d, _residentPostNormWeight!.Span, _residentPostNormBias!.Span, eps);
        backend.Read(h, output);
    }

    /// <summary>The backend the tower computes on.</summary>
    public IComputeBackend Backend => _backend;

    /// <summary>Makes every weight and norm resident on <paramref name="backend"/>; called at load, again after merging or quantizing.</summary>
    internal void Bind(IComputeBackend backend)
    {
        _patchEmbedding.Bind(backend);
        foreach (var linear in Linears)
            linear.Bind(backend);
        var norms = new ResidentNorms[_layers.Length];
        for (int i = 0; i < norms.Length; i++)
        {
            var l = _layers[i];
            norms[i] = new ResidentNorms(SmallTensors.Upload(backend, l.Norm1Weight), SmallTensors.Upload(backend, l.Norm1Bias),
                SmallTensors.Upload(backend, l.Norm2Weight), SmallTensors.Upload(backend, l.Norm2Bias));
        }
        _residentNorms = norms;
        _residentPositions = SmallTensors.Upload(backend, _positionEmbedding);
        _residentPostNormWeight = SmallTensors.Upload(backend, _postNormWeight);
        _residentPostNormBias = SmallTensors.Upload(backend, _postNormBias);
        _backend = backend;
    }

    private sealed record ResidentNorms(DeviceBuffer Norm1Weight, DeviceBuffer Norm1Bias, DeviceBuffer Norm2Weight, DeviceBuffer Norm2Bias);

    /// <summary>Lays each P×P patch out as one row in the conv weight's (channel, y, x) order, patches in raster order.</summary>
    private void Unfold(ReadOnlySpan<float> pixels, int images, Span<float> patches)
    {
        int s = _config.ImageSize, p = _config.PatchSize, side = _config.PatchesPerSide, rowLength = 3 * p * p;
        for (int b = 0; b < images; b++)
        for (int py = 0; py < side; py++)
        for (int px = 0; px < side; px++)
        {
            var row = patches.Slice(((b * side + py) * side + px) * rowLength, rowLength);
            int o = 0;
            for (int c = 0; c < 3; c++)
            for (int y = 0; y < p; y++)
            {
                pixels.Slice(((b * 3 + c) * s + py * p + y) * s + px * p, p).CopyTo(row.Slice(o, p));
                o += p;
            }
        }
    }
}

/// <summary>PaliGemma's multi-modal projector: one linear layer from the vision width to the text width.</summary>
public sealed class MultiModalProjector
{
    private readonly Linear _linear;

    public MultiModalProjector(int visionHidden, int projectionDim, SafetensorsCheckpoint checkpoint)
    {
        _linear = Linear.Load(checkpoint, "multi_modal_projector.linear", visionHidden, projectionDim, hasBias: true);
        Bind(CpuBackend.Instance);
    }

    public int OutFeatures => _linear.OutFeatures;

    internal Linear Linear => _linear;

    public void Forward(ReadOnlySpan<float> visionStates, int rows, Span<float> output, LoraAdapter? adapter = null)
    {
        if (_backend.IsHost)
        {
            _linear.Forward(visionStates, rows, output, adapter);
            return;
        }
        using var input = _backend.Allocate((long)rows * _linear.InFeatures);
        using var result = _backend.Allocate((long)rows * _linear.OutFeatures);
        _backend.Write(visionStates[..(rows * _linear.InFeatures)], input.Span);
        _linear.Forward(_backend, input.Span, rows, result.Span, adapter);
        _backend.Read(result.Span, output[..(rows * _linear.OutFeatures)]);
    }

    private IComputeBackend _backend = CpuBackend.Instance;

    internal void Bind(IComputeBackend backend)
    {
        _linear.Bind(backend);
        _backend = backend;
    }
}
