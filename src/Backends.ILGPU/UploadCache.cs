using ILGPU;
using ILGPU.Runtime;

namespace PaliGemma.CpuOnly.Backends.ILGPU;

/// <summary>
/// Small per-call host data (key ranges, rotary tables) kept on the device by content. Every layer of a forward pass
/// passes the same ranges and positions, so a pass uploads each distinct set once; a hit costs a comparison. A miss
/// waits for the device (the slot's buffer and host copy may still be read by queued work) and is copied synchronously.
/// </summary>
internal sealed class UploadCache<T> : IDisposable where T : unmanaged
{
    private readonly Accelerator _accelerator;
    private readonly Slot[] _slots;
    private long _clock;

    public UploadCache(Accelerator accelerator, int slots)
    {
        _accelerator = accelerator;
        _slots = new Slot[slots];
        for (int i = 0; i < slots; i++)
            _slots[i] = new Slot();
    }

    private sealed class Slot
    {
        public int[] Key = [];
        public int KeyLength = -1;
        public MemoryBuffer1D<T, Stride1D.Dense>? Buffer;
        public int ValueLength;
        public long LastUse;
    }

    public bool TryGet(ReadOnlySpan<int> key, out ArrayView<T> values)
    {
        foreach (var slot in _slots)
        {
            if (slot.KeyLength == key.Length && key.SequenceEqual(slot.Key.AsSpan(0, key.Length)))
            {
                slot.LastUse = ++_clock;
                values = slot.Buffer!.View.SubView(0, Math.Max(1, slot.ValueLength));
                return true;
            }
        }
        values = default;
        return false;
    }

    /// <summary>Stores <paramref name="values"/> under <paramref name="key"/> in the least recently used slot.</summary>
    public ArrayView<T> Put(ReadOnlySpan<int> key, ReadOnlySpan<T> values)
    {
        var slot = _slots[0];
        foreach (var candidate in _slots)
        {
            if (candidate.LastUse < slot.LastUse)
                slot = candidate;
        }

        _accelerator.DefaultStream.Synchronize();
        if (slot.Buffer is null || slot.Buffer.Length < values.Length)
        {
            slot.Buffer?.Dispose();
            slot.Buffer = _accelerator.Allocate1D<T>(Math.Max(1, Math.Max(values.Length, 2 * slot.Buffer?.Length ?? 0)));
        }
        if (slot.Key.Length < key.Length)
            slot.Key = new int[Math.Max(key.Length, 2 * slot.Key.Length)];
        key.CopyTo(slot.Key);
        slot.KeyLength = key.Length;
        slot.ValueLength = values.Length;
        slot.LastUse = ++_clock;
        if (!values.IsEmpty)
        {
            slot.Buffer.View.SubView(0, values.Length).CopyFromCPU(_accelerator.DefaultStream, values);
            // The copy may read the host memory asynchronously (OpenCL); the caller reuses it right away.
            _accelerator.DefaultStream.Synchronize();
        }
        return slot.Buffer.View.SubView(0, Math.Max(1, values.Length));
    }

    public void Dispose()
    {
        foreach (var slot in _slots)
        {
            slot.Buffer?.Dispose();
            slot.Buffer = null;
            slot.KeyLength = -1;
        }
    }
}
