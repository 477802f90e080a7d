using PaliGemma.CpuOnly.Kernels.Backends;

namespace PaliGemma.CpuOnly.Model;

/// <summary>
/// Keys and values of every decoder layer for a batch of sequences, fp32, laid out [layer][row, slot, kvHeads·headDim], in
/// buffers of the backend the decoder computes on.
/// <see cref="Valid"/> marks real (non-padding) positions per row; padding keys are never attended.
/// </summary>
/// <remarks>
/// A global layer keeps every position (slot = position). A sliding-window layer (Gemma 2, window W) only ever attends the
/// last W positions once the prompt is done, so it keeps a ring of min(W, capacity) slots: position p lives in slot p mod W.
/// Its memory is fixed however long the generation runs. The prompt itself is attended from the freshly projected keys
/// (its queries may look at later prompt keys, which the ring would not hold), and only its last W keys are kept.
/// </remarks>
public sealed class KvCache
{
    private readonly DeviceBuffer[] _keys, _values;
    private readonly int[] _windows, _slots;

    /// <summary>A cache whose layers all attend globally (Gemma 1).</summary>
    public KvCache(int layers, int batch, int capacity, int kvWidth) : this(new int[layers], batch, capacity, kvWidth)
    {
    }

    /// <param name="layerWindows">Per layer: 0 for global attention, or the sliding window W (the layer keeps min(W, capacity) slots).</param>
    public KvCache(ReadOnlySpan<int> layerWindows, int batch, int capacity, int kvWidth) : this(layerWindows, batch, capacity, kvWidth, CpuBackend.Instance)
    {
    }

    /// <param name="backend">Where the keys and values live (the backend the decoder computes on).</param>
    public KvCache(ReadOnlySpan<int> layerWindows, int batch, int capacity, int kvWidth, IComputeBackend backend)
    {
        ArgumentNullException.ThrowIfNull(backend);
        if (layerWindows.IsEmpty) throw new ArgumentException("a cache needs at least one layer", nameof(layerWindows));
        if (batch <= 0) throw new ArgumentOutOfRangeException(nameof(batch), batch, "batch must be positive");
        if (capacity <= 0) throw new ArgumentOutOfRangeException(nameof(capacity), capacity, "capacity must be positive");
        Batch = batch;
        Capacity = capacity;
        KvWidth = kvWidth;
        int layers = layerWindows.Length;
        _windows = layerWindows.ToArray();
        _slots = new int[layers];
        _keys = new DeviceBuffer[layers];
        _values = new DeviceBuffer[layers];
        Backend = backend;
        for (int l = 0; l < layers; l++)
        {
            if (_windows[l] < 0) throw new ArgumentOutOfRangeException(nameof(layerWindows), _windows[l], $"layer {l}: a sliding window must be positive (0 = global)");
            _slots[l] = _windows[l] == 0 ? capacity : Math.Min(_windows[l], capacity);
            long perLayer = (long)batch * _slots[l] * kvWidth;
            if (perLayer > Array.MaxLength)
                throw new ArgumentOutOfRangeException(nameof(capacity), capacity, $"a KV cache of {batch} row(s) x {_slots[l]} positions x {kvWidth} floats is too large for one layer");
            _keys[l] = backend.Allocate(perLayer);
            _values[l] = backend.Allocate(perLayer);
        }
        Valid = new byte[batch * capacity];
    }

    public IComputeBackend Backend { get; }
    public int Batch { get; }
    /// <summary>Positions a sequence may reach.</summary>
    public int Capacity { get; }
    public int KvWidth { get; }
    public int Layers => _keys.Length;

    /// <summary>Number of positions written so far (the same for every row: batches are left-padded).</summary>
    public int Length { get; internal set; }

    /// <summary>[row, position]: 1 where the position holds a real token.</summary>
    public byte[] Valid { get; }

    /// <summary>Bytes held by the cache (keys and values of all layers).</summary>
    public long SizeInBytes
    {
        get
        {
            long total = 0;
            foreach (var k in _keys) total += 2L * k.Length * sizeof(float);
            return total;
        }
    }

    /// <summary>The sliding window of <paramref name="layer"/>, 0 for global attention.</summary>
    public int Window(int layer) => _windows[layer];

    /// <summary>Key/value slots <paramref name="layer"/> holds per row: the capacity for a global layer, min(window, capacity) for a sliding one.</summary>
    public int Slots(int layer) => _slots[layer];

    /// <summary>True when <paramref name="layer"/> keeps a ring of slots (position p in slot p mod Slots) rather than every position.</summary>
    public bool IsRing(int layer) => _slots[layer] < Capacity;

    internal DeviceSpan Keys(int layer, int row) => _keys[layer].Slice((long)row * _slots[layer] * KvWidth, (long)_slots[layer] * KvWidth);
    internal DeviceSpan Values(int layer, int row) => _values[layer].Slice((long)row * _slots[layer] * KvWidth, (long)_slots[layer] * KvWidth);

    /// <summary>The decoder's reusable activation buffers for this cache (so a decode step allocates nothing); owned by <see cref="GemmaDecoder"/>.</summary>
    internal object? Workspace { get; set; }
    internal ReadOnlySpan<byte> ValidRow(int row) => Valid.AsSpan(row * Capacity, Capacity);

    public void Reset()
    {
        Length = 0;
        Array.Clear(Valid);
    }
}
