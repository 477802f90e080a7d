using System.Numerics.Tensors;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Model.Lora;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Model;

/// <summary>Receives the decoder's hidden states: index 0 = scaled input embeddings, i = output of layer i, L = after the final norm.</summary>
public delegate void HiddenStateObserver(int index, ReadOnlySpan<float> states);

/// <summary>
/// Gemma (1) decoder: RMSNorm with (1 + w), rotary embeddings (rotate-half), multi-query / grouped / multi-head attention,
/// GeGLU-tanh MLP, embeddings scaled by sqrt(hidden), LM head tied to the embeddings.
/// </summary>
public sealed class GemmaDecoder
{
    private const string Prefix = "language_model.model.";

    private readonly TextConfig _config;
    private readonly TensorData _embedTokens;
    private readonly WeightMatrix _lmHead;
    private readonly DecoderLayer[] _layers;
    private readonly float[] _finalNorm;

    private sealed record DecoderLayer(float[] InputNorm, Linear Q, Linear K, Linear V, Linear O, float[] PostAttentionNorm, Linear Gate, Linear Up, Linear Down);

    public GemmaDecoder(TextConfig config, SafetensorsCheckpoint checkpoint)
    {
        _config = config;
        int h = config.HiddenSize, qWidth = config.NumAttentionHeads * config.HeadDim, kvWidth = config.NumKeyValueHeads * config.HeadDim;
        _embedTokens = checkpoint.Require(Prefix + "embed_tokens.weight", [config.VocabSize, h]);
        _lmHead = WeightMatrix.FromTensor(_embedTokens);
        _layers = new DecoderLayer[config.NumHiddenLayers];
        for (int i = 0; i < _layers.Length; i++)
        {
            string l = $"{Prefix}layers.{i}.";
            bool bias = config.AttentionBias;
            _layers[i] = new DecoderLayer(
                SmallTensors.Load(checkpoint, l + "input_layernorm.weight", h),
                Linear.Load(checkpoint, l + "self_attn.q_proj", h, qWidth, bias),
                Linear.Load(checkpoint, l + "self_attn.k_proj", h, kvWidth, bias),
                Linear.Load(checkpoint, l + "self_attn.v_proj", h, kvWidth, bias),
                Linear.Load(checkpoint, l + "self_attn.o_proj", qWidth, h, bias),
                SmallTensors.Load(checkpoint, l + "post_attention_layernorm.weight", h),
                Linear.Load(checkpoint, l + "mlp.gate_proj", h, config.IntermediateSize, false),
                Linear.Load(checkpoint, l + "mlp.up_proj", h, config.IntermediateSize, false),
                Linear.Load(checkpoint, l + "mlp.down_proj", config.IntermediateSize, h, false));
        }
        _finalNorm = SmallTensors.Load(checkpoint, Prefix + "norm.weight", h);
        EmbeddingScale = MathF.Sqrt(h);
    }

    public TextConfig Config => _config;
    public int VocabSize => _config.VocabSize;
    /// <summary>Stored dtype of the embedding / LM head matrix.</summary>
    public DType EmbeddingDType => _embedTokens.DType;
    public int KvWidth => _config.NumKeyValueHeads * _config.HeadDim;

    /// <summary>sqrt(hidden) rounded to fp32, the factor Gemma multiplies its input embeddings by.</summary>
    public float EmbeddingScale { get; }

    /// <summary>The decoder's dense layers (LoRA targets), layer by layer: q, k, v, o, gate, up, down.</summary>
    internal IEnumerable<Linear> Linears =>
        _layers.SelectMany(static l => new[] { l.Q, l.K, l.V, l.O, l.Gate, l.Up, l.Down });

    public KvCache CreateCache(int batch, int capacity) => new(_config.NumHiddenLayers, batch, capacity, KvWidth);

    /// <summary>Writes the embedding row of <paramref name="tokenId"/> (upconverted to fp32) times sqrt(hidden) into <paramref name="destination"/>.</summary>
    public unsafe void EmbedToken(int tokenId, Span<float> destination)
    {
        int h = _config.HiddenSize;
        if ((uint)tokenId >= (uint)_config.VocabSize)
            throw new ArgumentOutOfRangeException(nameof(tokenId), tokenId, $"token id outside the vocabulary of {_config.VocabSize}");
        long offset = (long)tokenId * h;
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
    /// receives the final-normed states. Query at cache position p sees keys [0, max(prefixLength, p + 1)) that are valid:
    /// the prefix attends bidirectionally, later tokens causally.
    /// </summary>
    public void Forward(Span<float> hidden, int newTokens, ReadOnlySpan<int> positions, KvCache cache, int prefixLength,
        HiddenStateObserver? observer = null, CancellationToken cancellationToken = default, LoraAdapter? adapter = null)
    {
        int batch = cache.Batch, rows = batch * newTokens, h = _config.HiddenSize;
        int heads = _config.NumAttentionHeads, kvHeads = _config.NumKeyValueHeads, headDim = _config.HeadDim;
        int qWidth = heads * headDim, kvWidth = KvWidth, inner = _config.IntermediateSize;
        int start = cache.Length, end = start + newTokens;
        if (hidden.Length != rows * h) throw new ArgumentException($"hidden holds {hidden.Length} floats, {rows * h} needed", nameof(hidden));
        if (positions.Length != rows) throw new ArgumentException($"{positions.Length} positions for {rows} rows", nameof(positions));
        if (end > cache.Capacity)
            throw new InvalidOperationException($"the sequence would reach {end} positions but the KV cache holds {cache.Capacity}");
        if (adapter is not null && !ReferenceEquals(adapter.BaseModel.Decoder, this))
            throw new ArgumentException($"LoRA adapter '{adapter.Directory}' was loaded for another model", nameof(adapter));

        float[] normed = new float[rows * h], q = new float[rows * qWidth], k = new float[rows * kvWidth], v = new float[rows * kvWidth];
        float[] attn = new float[rows * qWidth], gate = new float[rows * inner], up = new float[rows * inner];
        int[] keyStart = new int[newTokens], keyEnd = new int[newTokens];
        for (int t = 0; t < newTokens; t++) keyEnd[t] = Math.Max(prefixLength, start + t + 1);
        float scale = 1f / MathF.Sqrt(headDim);

        observer?.Invoke(0, hidden);
        for (int li = 0; li < _layers.Length; li++)
        {
            cancellationToken.ThrowIfCancellationRequested();
            var layer = _layers[li];
            Norms.RmsNorm(hidden, normed, rows, h, layer.InputNorm, _config.RmsNormEps, unitOffset: true);
            layer.Q.Forward(normed, rows, q, adapter);
            layer.K.Forward(normed, rows, k, adapter);
            layer.V.Forward(normed, rows, v, adapter);
            Rope.Apply(q, rows, heads, headDim, qWidth, positions, _config.RopeTheta);
            Rope.Apply(k, rows, kvHeads, headDim, kvWidth, positions, _config.RopeTheta);
            for (int b = 0; b < batch; b++)
            {
                var cachedKeys = cache.Keys(li, b);
                var cachedValues = cache.Values(li, b);
                k.AsSpan(b * newTokens * kvWidth, newTokens * kvWidth).CopyTo(cachedKeys.Slice(start * kvWidth));
                v.AsSpan(b * newTokens * kvWidth, newTokens * kvWidth).CopyTo(cachedValues.Slice(start * kvWidth));
                var problem = new AttentionProblem
                {
                    Q = q.AsSpan(b * newTokens * qWidth, newTokens * qWidth), QRowStride = qWidth, Queries = newTokens,
                    K = cachedKeys[..(end * kvWidth)], V = cachedValues[..(end * kvWidth)], KvRowStride = kvWidth, Keys = end,
                    Heads = heads, KvHeads = kvHeads, HeadDim = headDim, Scale = scale,
                    KeyStart = keyStart, KeyEnd = keyEnd, KeyValid = cache.ValidRow(b)[..end],
                    Output = attn.AsSpan(b * newTokens * qWidth, newTokens * qWidth),
                };
                Attention.Forward(problem);
            }
            layer.O.Forward(attn, rows, normed, adapter);
            TensorPrimitives.Add(hidden, normed, hidden);

            Norms.RmsNorm(hidden, normed, rows, h, layer.PostAttentionNorm, _config.RmsNormEps, unitOffset: true);
            layer.Gate.Forward(normed, rows, gate, adapter);
            layer.Up.Forward(normed, rows, up, adapter);
            Activations.GeluTanhMul(gate, up, gate);
            layer.Down.Forward(gate, rows, normed, adapter);
            TensorPrimitives.Add(hidden, normed, hidden);
            if (li + 1 < _layers.Length) observer?.Invoke(li + 1, hidden);
        }
        cache.Length = end;
        Norms.RmsNorm(hidden, hidden, rows, h, _finalNorm, _config.RmsNormEps, unitOffset: true);
        observer?.Invoke(_layers.Length, hidden);
    }

    /// <summary>Logits [rows, vocab] of final-normed hidden states through the tied LM head.</summary>
    public void Logits(ReadOnlySpan<float> normedHidden, int rows, Span<float> logits) =>
        MatMul.Multiply(normedHidden, rows, _lmHead, default, logits);
}
