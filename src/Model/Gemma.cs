using System.Numerics.Tensors;
using PaliGemma.CpuOnly.Kernels;
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
        long total = _embedQuantized?.StreamedBytes ?? (long)_lmHead.Rows * _lmHead.Cols * _lmHead.DType.SizeOf();
        foreach (var linear in Linears)
            total += linear.Quantized?.StreamedBytes ?? (long)linear.OutFeatures * linear.InFeatures * linear.Weight.DType.SizeOf();
        return total;
    }

    /// <summary>Replaces the float embedding / LM head by a q8 copy (load-time quantization).</summary>
    internal void QuantizeEmbedding()
    {
        if (_embedQuantized is null)
            _embedQuantized = Quantizer.Quantize(_lmHead, QuantFormat.Q8);
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
        return new KvCache(windows, batch, capacity, KvWidth);
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
    /// layers drop keys more than a window behind.
    /// </summary>
    public void Forward(Span<float> hidden, int newTokens, ReadOnlySpan<int> positions, KvCache cache, int prefixLength,
        HiddenStateObserver? observer = null, CancellationToken cancellationToken = default, LoraAdapter? adapter = null,
        IProgress<InferenceProgress>? progress = null)
    {
        int batch = cache.Batch, rows = batch * newTokens, h = _config.HiddenSize;
        int heads = _config.NumAttentionHeads, kvHeads = _config.NumKeyValueHeads, headDim = _config.HeadDim;
        int qWidth = heads * headDim, kvWidth = KvWidth, inner = _config.IntermediateSize;
        int start = cache.Length, end = start + newTokens;
        if (hidden.Length != rows * h) throw new ArgumentException($"hidden holds {hidden.Length} floats, {rows * h} needed", nameof(hidden));
        if (positions.Length != rows) throw new ArgumentException($"{positions.Length} positions for {rows} rows", nameof(positions));
        if (end > cache.Capacity)
            throw new InvalidOperationException($"the sequence would reach {end} positions but the KV cache holds {cache.Capacity}");
        if (prefixLength > end)
            throw new ArgumentOutOfRangeException(nameof(prefixLength), prefixLength, $"the prefix cannot reach past the {end} positions written");
        if (cache.Layers != _layers.Length || cache.KvWidth != kvWidth)
            throw new ArgumentException($"the cache was made for {cache.Layers} layers of {cache.KvWidth} floats, not this decoder's {_layers.Length} of {kvWidth}", nameof(cache));
        if (adapter is not null && !ReferenceEquals(adapter.BaseModel.Decoder, this))
            throw new ArgumentException($"LoRA adapter '{adapter.Directory}' was loaded for another model", nameof(adapter));

        float[] normed = new float[rows * h], q = new float[rows * qWidth], k = new float[rows * kvWidth], v = new float[rows * kvWidth];
        float[] attn = new float[rows * qWidth], gate = new float[rows * inner], up = new float[rows * inner];
        var attention = new AttentionContext(newTokens, start, prefixLength, kvWidth);
        float scale = _config.AttentionScale, softCap = _config.AttnLogitSoftcapping ?? 0f, eps = _config.RmsNormEps;

        observer?.Invoke(0, hidden);
        for (int li = 0; li < _layers.Length; li++)
        {
            cancellationToken.ThrowIfCancellationRequested();
            var layer = _layers[li];
            Norms.RmsNorm(hidden, normed, rows, h, layer.InputNorm, eps, unitOffset: true);
            layer.Q.Forward(normed, rows, q, adapter);
            layer.K.Forward(normed, rows, k, adapter);
            layer.V.Forward(normed, rows, v, adapter);
            Rope.Apply(q, rows, heads, headDim, qWidth, positions, _config.RopeTheta);
            Rope.Apply(k, rows, kvHeads, headDim, kvWidth, positions, _config.RopeTheta);
            for (int b = 0; b < batch; b++)
            {
                var problem = new AttentionProblem
                {
                    Q = q.AsSpan(b * newTokens * qWidth, newTokens * qWidth), QRowStride = qWidth, Queries = newTokens,
                    KvRowStride = kvWidth, Heads = heads, KvHeads = kvHeads, HeadDim = headDim, Scale = scale, LogitSoftCap = softCap,
                    Output = attn.AsSpan(b * newTokens * qWidth, newTokens * qWidth),
                };
                attention.Bind(ref problem, cache, li, b, k.AsSpan(b * newTokens * kvWidth, newTokens * kvWidth),
                    v.AsSpan(b * newTokens * kvWidth, newTokens * kvWidth));
                Attention.Forward(problem);
                attention.Store(cache, li, b, k.AsSpan(b * newTokens * kvWidth, newTokens * kvWidth),
                    v.AsSpan(b * newTokens * kvWidth, newTokens * kvWidth));
            }
            layer.O.Forward(attn, rows, normed, adapter);
            if (layer.AttentionOutputNorm is { } attentionOutputNorm)
                Norms.RmsNorm(normed, normed, rows, h, attentionOutputNorm, eps, unitOffset: true);
            TensorPrimitives.Add(hidden, normed, hidden);

            Norms.RmsNorm(hidden, normed, rows, h, layer.FeedForwardInputNorm, eps, unitOffset: true);
            layer.Gate.Forward(normed, rows, gate, adapter);
            layer.Up.Forward(normed, rows, up, adapter);
            Activations.GeluTanhMul(gate, up, gate);
            layer.Down.Forward(gate, rows, normed, adapter);
            if (layer.FeedForwardOutputNorm is { } feedForwardOutputNorm)
                Norms.RmsNorm(normed, normed, rows, h, feedForwardOutputNorm, eps, unitOffset: true);
            TensorPrimitives.Add(hidden, normed, hidden);
            if (li + 1 < _layers.Length) observer?.Invoke(li + 1, hidden);
            progress?.Report(new InferenceProgress("prefill", li + 1, _layers.Length));
        }
        cache.Length = end;
        Norms.RmsNorm(hidden, hidden, rows, h, _finalNorm, eps, unitOffset: true);
        observer?.Invoke(_layers.Length, hidden);
    }

    /// <summary>
    /// Where one row's attention reads its keys for one layer, and where the new keys go afterwards.
    /// Global layers and sliding layers that hold every position (capacity &lt;= window): in place, slot = position.
    /// Sliding ring layers: one new token reads the ring itself (its window is exactly the ring); a prompt reads its own
    /// fresh keys (prompt queries may see later prompt keys, beyond what the ring keeps); several tokens after a prompt
    /// read a scratch copy of the window in position order. Either way only the last window keys are kept.
    /// </summary>
    private sealed class AttentionContext(int newTokens, int start, int prefixLength, int kvWidth)
    {
        private readonly int[] _keyStart = new int[newTokens], _keyEnd = new int[newTokens];
        private byte[] _slotValid = [];
        private float[] _scratchKeys = [], _scratchValues = [];
        private byte[] _scratchValid = [];
        private int _rangesFor = -1;   // window the key ranges were computed for (ranges depend on the window and the base)
        private int _rangesBase = -1;
        private bool _stored;          // the keys Bind just placed are already where they stay

        public void Bind(ref AttentionProblem problem, KvCache cache, int layer, int row, ReadOnlySpan<float> newKeys, ReadOnlySpan<float> newValues)
        {
            int end = start + newTokens, window = cache.Window(layer);
            var keys = cache.Keys(layer, row);
            var values = cache.Values(layer, row);
            var valid = cache.ValidRow(row);
            if (!cache.IsRing(layer))
            {
                newKeys.CopyTo(keys[(start * kvWidth)..]);
                newValues.CopyTo(values[(start * kvWidth)..]);
                _stored = true;
                SetRanges(window, keyBase: 0);
                Use(ref problem, keys[..(end * kvWidth)], values[..(end * kvWidth)], end, valid[..end]);
                return;
            }

            int slots = cache.Slots(layer);
            if (newTokens == 1 && AttentionMask.VisibleKeys(start, prefixLength, window) == (Math.Max(0, start - window + 1), start + 1))
            {
                // Decode: the query's window is exactly what the ring holds once the new key is in. Slot order differs
                // from position order, which a softmax does not mind.
                int slot = start % slots;
                newKeys.CopyTo(keys[(slot * kvWidth)..]);
                newValues.CopyTo(values[(slot * kvWidth)..]);
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
            if (_scratchKeys.Length < count * kvWidth)
            {
                _scratchKeys = new float[count * kvWidth];
                _scratchValues = new float[count * kvWidth];
            }
            for (int position = oldest; position < start; position++)
            {
                int slot = position % slots;
                keys.Slice(slot * kvWidth, kvWidth).CopyTo(_scratchKeys.AsSpan((position - oldest) * kvWidth));
                values.Slice(slot * kvWidth, kvWidth).CopyTo(_scratchValues.AsSpan((position - oldest) * kvWidth));
            }
            newKeys.CopyTo(_scratchKeys.AsSpan((start - oldest) * kvWidth));
            newValues.CopyTo(_scratchValues.AsSpan((start - oldest) * kvWidth));
            if (_scratchValid.Length < count) _scratchValid = new byte[count];
            valid[oldest..end].CopyTo(_scratchValid);
            SetRanges(window, keyBase: oldest);
            Use(ref problem, _scratchKeys.AsSpan(0, count * kvWidth), _scratchValues.AsSpan(0, count * kvWidth), count, _scratchValid.AsSpan(0, count));
        }

        /// <summary>After attention: a ring layer keeps the last min(newTokens, slots) new keys (in-place layers already hold them).</summary>
        public void Store(KvCache cache, int layer, int row, ReadOnlySpan<float> newKeys, ReadOnlySpan<float> newValues)
        {
            if (_stored)
                return;
            int slots = cache.Slots(layer);
            var keys = cache.Keys(layer, row);
            var values = cache.Values(layer, row);
            for (int t = Math.Max(0, newTokens - slots); t < newTokens; t++)
            {
                int slot = (start + t) % slots;
                newKeys.Slice(t * kvWidth, kvWidth).CopyTo(keys[(slot * kvWidth)..]);
                newValues.Slice(t * kvWidth, kvWidth).CopyTo(values[(slot * kvWidth)..]);
            }
        }

        private void SetRanges(int window, int keyBase)
        {
            if (_rangesFor == window && _rangesBase == keyBase)
                return;
            for (int t = 0; t < newTokens; t++)
            {
                var (first, last) = AttentionMask.VisibleKeys(start + t, prefixLength, window);
                _keyStart[t] = first - keyBase;
                _keyEnd[t] = last - keyBase;
            }
            _rangesFor = window;
            _rangesBase = keyBase;
        }

        private void Use(ref AttentionProblem problem, ReadOnlySpan<float> keys, ReadOnlySpan<float> values, int count, ReadOnlySpan<byte> valid)
        {
            problem.K = keys;
            problem.V = values;
            problem.Keys = count;
            problem.KeyStart = _keyStart;
            problem.KeyEnd = _keyEnd;
            problem.KeyValid = valid;
        }
    }

    /// <summary>Logits [rows, vocab] of final-normed hidden states through the tied LM head (Gemma 2: soft-capped in the same pass).</summary>
    public void Logits(ReadOnlySpan<float> normedHidden, int rows, Span<float> logits)
    {
        if (_embedQuantized is not null)
            QuantMatMul.Multiply(normedHidden, rows, _embedQuantized, default, logits, _config.FinalLogitSoftcapping ?? 0f);
        else if (_config.FinalLogitSoftcapping is { } cap)
            MatMul.Multiply(normedHidden, rows, _lmHead, default, logits, cap);
        else
            MatMul.Multiply(normedHidden, rows, _lmHead, default, logits);
    }
}
