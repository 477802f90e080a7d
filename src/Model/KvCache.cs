namespace PaliGemma.CpuOnly.Model;

/// <summary>
/// Keys and values of every decoder layer for a batch of sequences, fp32, laid out [layer][row, position, kvHeads·headDim].
/// <see cref="Valid"/> marks real (non-padding) positions per row; padding keys are never attended.
/// </summary>
public sealed class KvCache
{
    private readonly float[][] _keys, _values;

    public KvCache(int layers, int batch, int capacity, int kvWidth)
    {
        if (batch <= 0) throw new ArgumentOutOfRangeException(nameof(batch), batch, "batch must be positive");
        if (capacity <= 0) throw new ArgumentOutOfRangeException(nameof(capacity), capacity, "capacity must be positive");
        Batch = batch;
        Capacity = capacity;
        KvWidth = kvWidth;
        long perLayer = (long)batch * capacity * kvWidth;
        if (perLayer > Array.MaxLength)
            throw new ArgumentOutOfRangeException(nameof(capacity), capacity, $"a KV cache of {batch} row(s) x {capacity} positions x {kvWidth} floats is too large for one layer");
        _keys = new float[layers][];
        _values = new float[layers][];
        for (int l = 0; l < layers; l++)
        {
            _keys[l] = new float[perLayer];
            _values[l] = new float[perLayer];
        }
        Valid = new byte[batch * capacity];
    }

    public int Batch { get; }
    public int Capacity { get; }
    public int KvWidth { get; }

    /// <summary>Number of positions written so far (the same for every row: batches are left-padded).</summary>
    public int Length { get; internal set; }

    /// <summary>[row, position]: 1 where the position holds a real token.</summary>
    public byte[] Valid { get; }

    /// <summary>Bytes held by the cache (keys and values of all layers).</summary>
    public long SizeInBytes => 2L * _keys.Length * _keys[0].LongLength * sizeof(float);

    internal Span<float> Keys(int layer, int row) => _keys[layer].AsSpan(row * Capacity * KvWidth, Capacity * KvWidth);
    internal Span<float> Values(int layer, int row) => _values[layer].AsSpan(row * Capacity * KvWidth, Capacity * KvWidth);
    internal ReadOnlySpan<byte> ValidRow(int row) => Valid.AsSpan(row * Capacity, Capacity);

    public void Reset()
    {
        Length = 0;
        Array.Clear(Valid);
    }
}
