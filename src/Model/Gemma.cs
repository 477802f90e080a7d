using System.Numerics.Tensors;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Kernels.Backends;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Model.Lora;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Model;

/// <summary>Receives the decoder's hidden states: index 0 = scaled input embeddings, i = output of layer i, L = after the final norm.</summary>
public delegate void HiddenStateObserver(int index, ReadOnlySpan<float> states);

/// <summary>
/// Gemma decoder: RMSNorm with (1 + w), rotary embeddings (rotate-half), multi-query / grouped / multi-head attention,
/// GeGLU-tanh MLP, embeddings scaled by sqrt(hidden), LM head tied to the embeddings.
/// Gemma 2 (<see cref="TextConfig.IsGemma2"/>) adds, per layer: norms after attention and after the MLP (four in all),
/// a sliding window on even layers, scores scaled by query_pre_attn_scalar^-0.5 and tanh soft-capped; and soft-capped logits.
/// </summary>
public sealed class GemmaDecoder
{
    private const string Prefix = "language_model.model.";

    private readonly TextConfig _config;
    private readonly TensorData _embedTokens;
    private readonly WeightMatrix _lmHead;
    // The tied embedding / LM head in q8 (quantized checkpoint or load-time quantization); when set, the two above are unused.
    private QuantizedMatrix? _embedQuantized;
    private readonly DecoderLayer[] _layers;
    private readonly float[] _finalNorm;
    private IComputeBackend _backend = CpuBackend.Instance;
    private ResidentNorms[] _residentNorms = [];
    private DeviceBuffer? _residentFinalNorm;
    private ResidentMatrix? _residentLmHead;   // device backends only: the CPU reads the LM head in place

    // Gemma 1 has no AttentionOutputNorm / FeedForwardOutputNorm and calls its FeedForwardInputNorm post_attention_layernorm.
    private sealed record DecoderLayer(float[] InputNorm, Linear Q, Linear K, Linear V, Linear O, float[]? AttentionOutputNorm,
        float[] FeedForwardInputNorm, float[]? FeedForwardOutputNorm, Linear Gate, Linear Up, Linear Down, int Window);

    public GemmaDecoder(TextConfig config, SafetensorsCheckpoint checkpoint)
    {
        _config = config;
        int h = config.HiddenSize, qWidth = config.NumAttentionHeads * config.HeadDim, kvWidth = config.NumKeyValueHeads * config.HeadDim;
        if (!checkpoint.Contains(Prefix + "embed_tokens.weight") &&
            QuantizedCheckpoint.TryOpen(checkpoint, Prefix + "embed_tokens.weight", config.VocabSize, h) is { } quantized)
        {
            _embedQuantized = quantized.Format == QuantFormat.Q8 ? quantized
                : throw new InvalidDataException($"'{checkpoint.Directory}': the embedding '{Prefix}embed_tokens.weight' is {quantized.Format.Name()}; quantized checkpoints store it as q8");
        }
        else
        {
            _embedTokens = checkpoint.Require(Prefix + "embed_tokens.weight", [config.VocabSize, h]);
            _lmHead = WeightMatrix.FromTensor(_embedTokens);
        }
        _layers = new DecoderLayer[config.NumHiddenLayers];
        for (int i = 0; i < _layers.Length; i++)
        {
            string l = $"{Prefix}layers.{i}.";
            bool bias = config.AttentionBias;
            bool gemma2 = config.IsGemma2;
            _layers[i] = new DecoderLayer(
                SmallTensors.Load(checkpoint, l + "input_layernorm.weight", h),
                Linear.Load(checkpoint, l + "self_attn.q_proj", h, qWidth, bias),
                Linear.Load(checkpoint, l + "self_attn.k_proj", h, kvWidth, bias),
                Linear.Load(checkpoint, l + "self_attn.v_proj", h, kvWidth, bias),
                Linear.Load(checkpoint, l + "self_attn.o_proj", qWidth, h, bias),
                gemma2 ? SmallTensors.Load(checkpoint, l + "post_attention_layernorm.weight", h) : null,
                SmallTensors.Load(checkpoint, l + (gemma2 ? "pre_feedforward_layernorm.weight" : "post_attention_layernorm.weight"), h),
                gemma2 ? SmallTensors.Load(checkpoint, l + "post_feedforward_layernorm.weight", h) : null,
                Linear.Load(checkpoint, l + "mlp.gate_proj", h, config.IntermediateSize, false),
                Linear.Load(checkpoint, l + "mlp.up_proj", h, config.IntermediateSize, false),
                Linear.Load(checkpoint, l + "mlp.down_proj", config.IntermediateSize, h, false),
                config.LayerWindow(i));
        }
        _finalNorm = SmallTensors.Load(checkpoint, Prefix + "norm.weight", h);
        EmbeddingScale = MathF.Sqrt(h);
        Bind(CpuBackend.Instance);
    }

    public TextConfig Config => _config;
    public int VocabSize => _config.VocabSize;
    /// <summary>Stored dtype of the embedding / LM head matrix.</summary>
    public DType EmbeddingDType => _embedQuantized is null ? _embedTokens.DType : DType.I8;
    /// <summary>The q8 embedding / LM head when quantized, else null.</summary>
    public QuantizedMatrix? QuantizedEmbedding => _embedQuantized;

    /// <summary>
    /// Bytes one decode step streams: every decoder matrix and the LM head as held now (quantized: codes plus scales;
    /// float: the stored dtype). Norms and biases are left out (small fp32 arrays that stay in cache).
    /// </summary>
    public long DecodeWeightBytesPerToken()
    {
        long total = LmHeadOperand.StreamedBytes;
        foreach (var linear in Linears)
            total += linear.Operand.StreamedBytes;
        return total;
    }

    /// <summary>The memory <see cref="DecodeWeightBytesPerToken"/> counts, matrix by matrix (for a read probe over the pages decode streams).</summary>
    public IReadOnlyList<MemoryRegion> DecodeWeightRegions() =>
        Linears.Select(linear => linear.Operand).Append(LmHeadOperand).SelectMany(operand => operand.StreamedRegions).ToList();

    /// <summary>Replaces the float embedding / LM head by a q8 copy (load-time quantization).</summary>
    internal void QuantizeEmbedding(ScaleSelection scales)
    {
        if (_embedQuantized is null)
        {
            _embedQuantized = Quantizer.Quantize(_lmHead, QuantFormat.Q8, scales);
            _lmHeadOperand = null;
        }
    }
    public int KvWidth => _config.NumKeyValueHeads * _config.HeadDim;

    /// <summary>sqrt(hidden) rounded to fp32, the factor Gemma multiplies its input embeddings by.</summary>
    public float EmbeddingScale { get; }

    /// <summary>The decoder's dense layers (LoRA targets), layer by layer: q, k, v, o, gate, up, down.</summary>
    internal IEnumerable<Linear> Linears =>
        _layers.SelectMany(static l => new[] { l.Q, l.K, l.V, l.O, l.Gate, l.Up, l.Down });

    /// <summary>A cache for <paramref name="batch"/> rows of up to <paramref name="capacity"/> positions; sliding layers keep a ring of window slots.</summary>
    public KvCache CreateCache(int batch, int capacity)
    {
        var windows = new int[_layers.Length];
        for (int i = 0; i < windows.Length; i++) windows[i] = _layers[i].Window;
        return new KvCache(windows, batch, capacity, KvWidth, _backend);
    }

    /// <summary>Writes the embedding row of <paramref name="tokenId"/> (upconverted to fp32) times sqrt(hidden) into <paramref name="destination"/>.</summary>
    public unsafe void EmbedToken(int tokenId, Span<float> destination)
    {
        int h = _config.HiddenSize;
        if ((uint)tokenId >= (uint)_config.VocabSize)
            throw new ArgumentOutOfRangeException(nameof(tokenId), tokenId, $"token id outside the vocabulary of {_config.VocabSize}");
        long offset = (long)tokenId * h;
        if (_embedQuantized is not null)
        {
            _embedQuantized.DequantizeRow(tokenId, destination[..h]);
            TensorPrimitives.Multiply(destination[..h], EmbeddingScale, destination[..h]);
            return;
        }
        switch (_embedTokens.DType)
        {
            case DType.F32:
                new ReadOnlySpan<float>((float*)_embedTokens.Pointer + offset, h).CopyTo(destination);
                break;
            case DType.BF16:
                var bf = new ReadOnlySpan<ushort>((ushort*)_embedTokens.Pointer + offset, h);
                for (int i = 0; i < h; i++) destination[i] = BitConverter.Int32BitsToSingle(bf[i] << 16);
                break;
            case DType.F16:
                TensorPrimitives.ConvertToSingle(new ReadOnlySpan<Half>((Half*)_embedTokens.Pointer + offset, h), destination[..h]);
                break;
            default:
                throw new InvalidDataException($"embedding tensor '{_embedTokens.Name}' has unsupported dtype {_embedTokens.DType}");
        }
        TensorPrimitives.Multiply(destination[..h], EmbeddingScale, destination[..h]);
    }

    /// <summary>
    /// Runs <paramref name="newTokens"/> positions per row through every layer, appending their keys and values to
    /// <paramref name="cache"/>. <paramref name="hidden"/> [rows·newTokens, hidden] holds the scaled input embeddings and
    /// receives the final-normed states. Query at cache position p sees the valid keys of
    /// <see cref="AttentionMask.VisibleKeys"/>: the prefix attends bidirectionally, later tokens causally, and sliding
    /// layers drop keys more than a window behind. The work runs on the decoder's backend; the activations stay there
    /// between layers (in buffers the cache keeps, so a decode step allocates nothing).
    /// </summary>
    public void Forward(Span<float> hidden, int newTokens, ReadOnlySpan<int> positions, KvCache cache, int prefixLength,
        HiddenStateObserver? observer = null, CancellationToken cancellationToken = default, LoraAdapter? adapter = null,
        IProgress<InferenceProgress>? progress = null)
    {
        var backend = _backend;
        int batch = cache.Batch, rows = batch * newTokens, h = _config.HiddenSize;
        int heads = _config.NumAttentionHeads, kvHeads = _config.NumKeyValueHeads, headDim = _config.HeadDim;
        int qWidth = heads * headDim, kvWidth = KvWidth;
        int start = cache.Length, end = start + newTokens;
        if (hidden.Length != rows * h) throw new ArgumentException($"hidden holds {hidden.Length} floats, {rows * h} needed", nameof(hidden));
        if (positions.Length != rows) throw new ArgumentException($"{positions.Length} positions for {rows} rows", nameof(positions));
        if (end > cache.Capacity)
            throw new InvalidOperationException($"the sequence would reach {end} positions but the KV cache holds {cache.Capacity}");
        if (prefixLength > end)
            throw new ArgumentOutOfRangeException(nameof(prefixLength), prefixLength, $"the prefix cannot reach past the {end} positions written");
        if (cache.Layers != _layers.Length || cache.KvWidth != kvWidth)
            throw new ArgumentException($"the cache was made for {cache.Layers} layers of {cache.KvWidth} floats, not this decoder's {_layers.Length} of {kvWidth}", nameof(cache));
        if (!ReferenceEquals(cache.Backend, backend))
            throw new ArgumentException($"the cache lives on '{cache.Backend.Name}' but the decoder computes on '{backend.Name}'; make caches with CreateCache", nameof(cache));
        if (adapter is not null && !ReferenceEquals(adapter.BaseModel.Decoder, this))
            throw new ArgumentException($"LoRA adapter '{adapter.Directory}' was loaded for another model", nameof(adapter));

        var ws = WorkspaceFor(cache, rows);
        DeviceSpan x = ws.Hidden.Slice(0, rows * h), normed = ws.Normed.Slice(0, rows * h);
        DeviceSpan q = ws.Q.Slice(0, rows * qWidth), k = ws.K.Slice(0, rows * kvWidth), v = ws.V.Slice(0, rows * kvWidth);
        DeviceSpan attn = ws.Attention.Slice(0, rows * qWidth);
        DeviceSpan gate = ws.Gate.Slice(0, rows * _config.IntermediateSize), up = ws.Up.Slice(0, rows * _config.IntermediateSize);
        var attention = ws.Context;
        attention.Begin(newTokens, start, prefixLength);
        float scale = _config.AttentionScale, softCap = _config.AttnLogitSoftcapping ?? 0f, eps = _config.RmsNormEps;

        backend.Write(hidden, x);
        Observe(observer, 0, x, ws);
        for (int li = 0; li < _layers.Length; li++)
        {
            cancellationToken.ThrowIfCancellationRequested();
            var layer = _layers[li];
            var norms = _residentNorms[li];
            backend.RmsNorm(x, normed, rows, h, norms.Input.Span, eps, unitOffset: true);
            // q, k and v read the same normed x: one call (a quantized token is coded once, one parallel batch).
            Linear.ForwardSameInput(backend, normed, rows, [layer.Q, layer.K, layer.V], [q, k, v], adapter);
            backend.Rope(q, rows, heads, headDim, qWidth, positions, _config.RopeTheta);
            backend.Rope(k, rows, kvHeads, headDim, kvWidth, positions, _config.RopeTheta);
            for (int b = 0; b < batch; b++)
            {
                var rowKeys = k.Slice(b * newTokens * kvWidth, newTokens * kvWidth);
                var rowValues = v.Slice(b * newTokens * kvWidth, newTokens * kvWidth);
                var problem = new DeviceAttentionProblem
                {
                    Q = q.Slice(b * newTokens * qWidth, newTokens * qWidth), QRowStride = qWidth, Queries = newTokens,
                    KvRowStride = kvWidth, Heads = heads, KvHeads = kvHeads, HeadDim = headDim, Scale = scale, LogitSoftCap = softCap,
                    Output = attn.Slice(b * newTokens * qWidth, newTokens * qWidth),
                };
                attention.Bind(ref problem, cache, li, b, rowKeys, rowValues);
                backend.Attention(problem);
                attention.Store(cache, li, b, rowKeys, rowValues);
            }
            layer.O.Forward(backend, attn, rows, normed, adapter);
            if (norms.AttentionOutput is { } attentionOutputNorm)
                backend.RmsNorm(normed, normed, rows, h, attentionOutputNorm.Span, eps, unitOffset: true);
            backend.Add(x, normed, x);

            backend.RmsNorm(x, normed, rows, h, norms.FeedForwardInput.Span, eps, unitOffset: true);
            Linear.ForwardSameInput(backend, normed, rows, [layer.Gate, layer.Up], [gate, up], adapter);
            backend.GeluTanhMul(gate, up, gate);
            layer.Down.Forward(backend, gate, rows, normed, adapter);
            if (norms.FeedForwardOutput is { } feedForwardOutputNorm)
                backend.RmsNorm(normed, normed, rows, h, feedForwardOutputNorm.Span, eps, unitOffset: true);
            backend.Add(x, normed, x);
            if (li + 1 < _layers.Length) Observe(observer, li + 1, x, ws);
            progress?.Report(new InferenceProgress("prefill", li + 1, _layers.Length));
        }
        cache.Length = end;
        backend.RmsNorm(x, x, rows, h, _residentFinalNorm!.Span, eps, unitOffset: true);
        backend.Read(x, hidden);
        observer?.Invoke(_layers.Length, hidden);
    }

    private void Observe(HiddenStateObserver? observer, int index, DeviceSpan states, DecoderWorkspace ws)
    {
        if (observer is null)
            return;
        if (_backend.IsHost)
        {
            observer(index, states.HostSpan);
            return;
        }
        var copy = new float[states.Length];
        _backend.Read(states, copy);
        observer(index, copy);
    }

    private DecoderWorkspace WorkspaceFor(KvCache cache, int rows)
    {
        if (cache.Workspace is not DecoderWorkspace ws || ws.Rows < rows || !ReferenceEquals(ws.Backend, _backend))
        {
            (cache.Workspace as DecoderWorkspace)?.Dispose();
            ws = new DecoderWorkspace(_backend, _config, rows, KvWidth);
            cache.Workspace = ws;
        }
        return ws;
    }

    /// <summary>One cache's activation buffers on the backend, sized for the most rows seen so far (a prompt), reused by every step.</summary>
    private sealed class DecoderWorkspace : IDisposable
    {
        public DecoderWorkspace(IComputeBackend backend, TextConfig config, int rows, int kvWidth)
        {
            int qWidth = config.NumAttentionHeads * config.HeadDim;
            Backend = backend;
            Rows = rows;
            Hidden = backend.Allocate((long)rows * config.HiddenSize);
            Normed = backend.Allocate((long)rows * config.HiddenSize);
            Q = backend.Allocate((long)rows * qWidth);
            K = backend.Allocate((long)rows * kvWidth);
            V = backend.Allocate((long)rows * kvWidth);
            Attention = backend.Allocate((long)rows * qWidth);
            Gate = backend.Allocate((long)rows * config.IntermediateSize);
            Up = backend.Allocate((long)rows * config.IntermediateSize);
            Context = new AttentionContext(backend, kvWidth);
        }

        public IComputeBackend Backend { get; }
        public int Rows { get; }
        public DeviceBuffer Hidden { get; }
        public DeviceBuffer Normed { get; }
        public DeviceBuffer Q { get; }
        public DeviceBuffer K { get; }
        public DeviceBuffer V { get; }
        public DeviceBuffer Attention { get; }
        public DeviceBuffer Gate { get; }
        public DeviceBuffer Up { get; }
        public AttentionContext Context { get; }
        // Logits of the last step's rows, for device backends (the CPU writes the caller's span directly).
        public DeviceBuffer? Logits { get; set; }

        public void Dispose()
        {
            foreach (var buffer in new[] { Hidden, Normed, Q, K, V, Attention, Gate, Up, Logits })
                buffer?.Dispose();
            Context.Dispose();
        }
    }

    /// <summary>
    /// Where one row's attention reads its keys for one layer, and where the new keys go afterwards.
    /// Global layers and sliding layers that hold every position (capacity &lt;= window): in place, slot = position.
    /// Sliding ring layers: one new token reads the ring itself (its window is exactly the ring); a prompt reads its own
    /// fresh keys (prompt queries may see later prompt keys, beyond what the ring keeps); several tokens after a prompt
    /// read a scratch copy of the window in position order. Either way only the last window keys are kept.
    /// Reused across calls: <see cref="Begin"/> resets it for each forward pass.
    /// </summary>
    private sealed class AttentionContext(IComputeBackend backend, int kvWidth) : IDisposable
    {
        private int _newTokens, _start, _prefixLength;
        private int[] _keyStart = [], _keyEnd = [];
        private byte[] _slotValid = [];
        private DeviceBuffer? _scratchKeys, _scratchValues;
        private byte[] _scratchValid = [];
        private int _rangesFor = -1;   // window the key ranges were computed for (ranges depend on the window and the base)
        private int _rangesBase = -1;
        private bool _stored;          // the keys Bind just placed are already where they stay

        public void Begin(int newTokens, int start, int prefixLength)
        {
            if (_keyStart.Length < newTokens)
            {
                _keyStart = new int[newTokens];
                _keyEnd = new int[newTokens];
            }
            _newTokens = newTokens;
            _start = start;
            _prefixLength = prefixLength;
            _rangesFor = -1;
            _rangesBase = -1;
        }

        public void Bind(ref DeviceAttentionProblem problem, KvCache cache, int layer, int row, DeviceSpan newKeys, DeviceSpan newValues)
        {
            int newTokens = _newTokens, start = _start;
            int end = start + newTokens, window = cache.Window(layer);
            var keys = cache.Keys(layer, row);
            var values = cache.Values(layer, row);
            var valid = cache.ValidRow(row);
            if (!cache.IsRing(layer))
            {
                backend.Copy(newKeys, keys.Slice(start * kvWidth, newTokens * kvWidth));
                backend.Copy(newValues, values.Slice(start * kvWidth, newTokens * kvWidth));
                _stored = true;
                SetRanges(window, keyBase: 0);
                Use(ref problem, keys.Slice(0, end * kvWidth), values.Slice(0, end * kvWidth), end, valid[..end]);
                return;
            }

            int slots = cache.Slots(layer);
            if (newTokens == 1 && AttentionMask.VisibleKeys(start, _prefixLength, window) == (Math.Max(0, start - window + 1), start + 1))
            {
                // Decode: the query's window is exactly what the ring holds once the new key is in. Slot order differs
                // from position order, which a softmax does not mind.
                int slot = start % slots;
                backend.Copy(newKeys, keys.Slice(slot * kvWidth, kvWidth));
                backend.Copy(newValues, values.Slice(slot * kvWidth, kvWidth));
                _stored = true;
                if (_slotValid.Length != slots) _slotValid = new byte[slots];
                for (int s = 0; s < slots; s++)
                {
                    int position = s <= slot ? start - (slot - s) : start - (slot - s + slots);
                    _slotValid[s] = position >= 0 && valid[position] != 0 ? (byte)1 : (byte)0;
                }
                _keyStart[0] = 0;
                _keyEnd[0] = Math.Min(start + 1, slots);
                _rangesFor = -1;
                Use(ref problem, keys, values, slots, _slotValid);
                return;
            }

            _stored = false;
            if (start == 0)
            {
                SetRanges(window, keyBase: 0);
                Use(ref problem, newKeys, newValues, newTokens, valid[..end]);
                return;
            }

            // Several tokens after earlier ones: the window behind the first new token, then the new keys, in position order.
            int oldest = Math.Max(0, start - (window - 1));
            int count = end - oldest;
            if (_scratchKeys is null || _scratchKeys.Length < (long)count * kvWidth)
            {
                _scratchKeys?.Dispose();
                _scratchValues?.Dispose();
                _scratchKeys = backend.Allocate((long)count * kvWidth);
                _scratchValues = backend.Allocate((long)count * kvWidth);
            }
            for (int position = oldest; position < start; position++)
            {
                int slot = position % slots;
                backend.Copy(keys.Slice(slot * kvWidth, kvWidth), _scratchKeys.Slice((position - oldest) * kvWidth, kvWidth));
                backend.Copy(values.Slice(slot * kvWidth, kvWidth), _scratchValues!.Slice((position - oldest) * kvWidth, kvWidth));
            }
            backend.Copy(newKeys, _scratchKeys.Slice((start - oldest) * kvWidth, newTokens * kvWidth));
            backend.Copy(newValues, _scratchValues!.Slice((start - oldest) * kvWidth, newTokens * kvWidth));
            if (_scratchValid.Length < count) _scratchValid = new byte[count];
            valid[oldest..end].CopyTo(_scratchValid);
            SetRanges(window, keyBase: oldest);
            Use(ref problem, _scratchKeys.Slice(0, count * kvWidth), _scratchValues.Slice(0, count * kvWidth), count, _scratchValid.AsSpan(0, count));
        }

        /// <summary>After attention: a ring layer keeps the last min(newTokens, slots) new keys (in-place layers already hold them).</summary>
        public void Store(KvCache cache, int layer, int row, DeviceSpan newKeys, DeviceSpan newValues)
        {
            if (_stored)
                return;
            int slots = cache.Slots(layer);
            var keys = cache.Keys(layer, row);
            var values = cache.Values(layer, row);
            for (int t = Math.Max(0, _newTokens - slots); t < _newTokens; t++)
            {
                int slot = (_start + t) % slots;
                backend.Copy(newKeys.Slice(t * kvWidth, kvWidth), keys.Slice(slot * kvWidth, kvWidth));
                backend.Copy(newValues.Slice(t * kvWidth, kvWidth), values.Slice(slot * kvWidth, kvWidth));
            }
        }

        private void SetRanges(int window, int keyBase)
        {
            if (_rangesFor == window && _rangesBase == keyBase)
                return;
            for (int t = 0; t < _newTokens; t++)
            {
                var (first, last) = AttentionMask.VisibleKeys(_start + t, _prefixLength, window);
                _keyStart[t] = first - keyBase;
                _keyEnd[t] = last - keyBase;
            }
            _rangesFor = window;
            _rangesBase = keyBase;
        }

        private void Use(ref DeviceAttentionProblem problem, DeviceSpan keys, DeviceSpan values, int count, ReadOnlySpan<byte> valid)
        {
            problem.K = keys;
            problem.V = values;
            problem.Keys = count;
            problem.KeyStart = _keyStart.AsSpan(0, _newTokens);
            problem.KeyEnd = _keyEnd.AsSpan(0, _newTokens);
            problem.KeyValid = valid;
        }

        public void Dispose()
        {
            _scratchKeys?.Dispose();
            _scratchValues?.Dispose();
        }
    }

    /// <summary>
    /// Logits [rows, vocab] of final-normed hidden states through the tied LM head (Gemma 2: soft-capped in the same pass).
    /// <paramref name="cache"/>, when given, lends its workspace to a device backend so repeated calls allocate nothing.
    /// </summary>
    public void Logits(ReadOnlySpan<float> normedHidden, int rows, Span<float> logits, KvCache? cache = null)
    {
        float cap = _config.FinalLogitSoftcapping ?? 0f;
        int h = _config.HiddenSize, vocab = _config.VocabSize;
        if (normedHidden.Length < (long)rows * h) throw new ArgumentException($"hidden holds {normedHidden.Length} floats, {rows * h} needed", nameof(normedHidden));
        if (logits.Length < (long)rows * vocab) throw new ArgumentException($"logits hold {logits.Length} floats, {(long)rows * vocab} needed", nameof(logits));
        if (_backend.IsHost)
        {
            // The host kernels read the caller's memory directly.
            LmHeadOperand.MultiplyOnHost(normedHidden[..(rows * h)], rows, default, logits[..(rows * vocab)], cap);
            return;
        }
        // With a cache, its workspace lends the buffers (sized up as needed), so repeated calls allocate nothing.
        DecoderWorkspace? ws = cache is not null && ReferenceEquals(cache.Backend, _backend) ? WorkspaceFor(cache, Math.Max(rows, 1)) : null;
        DeviceBuffer input = ws?.Normed ?? _backend.Allocate((long)rows * h);
        if (ws is not null && (ws.Logits is null || ws.Logits.Length < (long)rows * vocab))
        {
            ws.Logits?.Dispose();
            ws.Logits = _backend.Allocate((long)rows * vocab);
        }
        DeviceBuffer output = ws?.Logits ?? _backend.Allocate((long)rows * vocab);
        try
        {
            _backend.Write(normedHidden[..(rows * h)], input.Slice(0, rows * h));
            _backend.MatMul(input.Slice(0, rows * h), rows, _residentLmHead!, output.Slice(0, (long)rows * vocab), cap);
            _backend.Read(output.Slice(0, (long)rows * vocab), logits[..(rows * vocab)]);
        }
        finally
        {
            if (ws is null)
            {
                input.Dispose();
                output.Dispose();
            }
        }
    }

    // Computed once: the float LM head is a struct, and boxing it per call would allocate on every decode step.
    private IMatrixOperand LmHeadOperand => _lmHeadOperand ??= _embedQuantized is not null ? _embedQuantized : _lmHead;
    private IMatrixOperand? _lmHeadOperand;

    /// <summary>The backend the decoder computes on (the CPU unless the model was loaded with another).</summary>
    public IComputeBackend Backend => _backend;

    /// <summary>Makes every weight and norm resident on <paramref name="backend"/>; called at load, again after merging or quantizing.</summary>
    internal void Bind(IComputeBackend backend)
    {
        foreach (var linear in Linears)
            linear.Bind(backend);
        var norms = new ResidentNorms[_layers.Length];
        for (int i = 0; i < norms.Length; i++)
        {
            var l = _layers[i];
            norms[i] = new ResidentNorms(SmallTensors.Upload(backend, l.InputNorm), ResidentOrNull(backend, l.AttentionOutputNorm),
                SmallTensors.Upload(backend, l.FeedForwardInputNorm), ResidentOrNull(backend, l.FeedForwardOutputNorm));
        }
        _residentNorms = norms;
        _residentFinalNorm = SmallTensors.Upload(backend, _finalNorm);
        var previousHead = _residentLmHead;
        _residentLmHead = backend.IsHost ? null : backend.Upload(LmHeadOperand, default);
        previousHead?.Dispose();
        _backend = backend;
    }

    private static DeviceBuffer? ResidentOrNull(IComputeBackend backend, float[]? values) => values is null ? null : SmallTensors.Upload(backend, values);

    private sealed record ResidentNorms(DeviceBuffer Input, DeviceBuffer? AttentionOutput, DeviceBuffer FeedForwardInput, DeviceBuffer? FeedForwardOutput);
}
