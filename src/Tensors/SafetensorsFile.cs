using System.Collections.ObjectModel;
using System.IO.MemoryMappedFiles;

namespace PaliGemma.CpuOnly.Tensors;

/// <summary>
/// One memory-mapped <c>.safetensors</c> file. The file is mapped read-only and tensors are handed out as
/// <see cref="TensorData"/> views that point straight into the mapping; nothing is copied. The header is fully
/// validated on <see cref="Open"/>, so every <see cref="TensorData"/> handed out lies inside the file.
/// </summary>
/// <remarks>
/// Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data block. Each header
/// entry gives a tensor's dtype, shape and <c>data_offsets</c> [begin, end) relative to the data block.
/// Data offsets are not guaranteed to be aligned to the element size; that is fine because the kernels read
/// weights with unaligned vector loads, so no copy or realignment is done here.
/// The views stay valid until <see cref="Dispose"/>; using a <see cref="TensorData"/> after that is a bug.
/// </remarks>
public sealed unsafe class SafetensorsFile : IDisposable
{
    private readonly MemoryMappedFile _mapping;
    private readonly MemoryMappedViewAccessor _view;
    private readonly byte* _dataStart;
    private readonly Dictionary<string, SafetensorsHeader.Entry> _entries;
    private bool _disposed;

    private SafetensorsFile(string path, long fileLength, MemoryMappedFile mapping, MemoryMappedViewAccessor view, byte* dataStart, SafetensorsHeader header)
    {
        Path = path;
        FileLength = fileLength;
        _mapping = mapping;
        _view = view;
        _dataStart = dataStart;
        _entries = header.Entries;
        Metadata = new ReadOnlyDictionary<string, string>(header.Metadata);
        TensorNames = new ReadOnlyCollection<string>(header.Names);
    }

    /// <summary>Full path of the mapped file.</summary>
    public string Path { get; }

    /// <summary>The optional <c>__metadata__</c> map of the header (empty when absent).</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>Tensor names in header order.</summary>
    public IReadOnlyCollection<string> TensorNames { get; }

    /// <summary>Size of the whole file in bytes.</summary>
    public long FileLength { get; }

    /// <summary>Maps <paramref name="path"/> read-only and validates its header.</summary>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <exception cref="InvalidDataException">The file is not a well-formed safetensors file; the message names the file and tensor.</exception>
    public static SafetensorsFile Open(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        string fullPath = System.IO.Path.GetFullPath(path);
        if (!File.Exists(fullPath))
            throw new FileNotFoundException($"{fullPath}: safetensors file not found", fullPath);

        // Open the stream ourselves so the length we validate against is the length we map.
        var stream = new FileStream(fullPath, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1, FileOptions.None);
        MemoryMappedFile? mapping = null;
        MemoryMappedViewAccessor? view = null;
        bool pointerAcquired = false;
        try
        {
            long fileLength = stream.Length;
            if (fileLength < sizeof(ulong))
                throw new InvalidDataException(
                    $"{fullPath}: file is {fileLength} bytes; a safetensors file starts with an 8-byte header length");

            mapping = MemoryMappedFile.CreateFromFile(stream, mapName: null, capacity: 0, MemoryMappedFileAccess.Read,
                HandleInheritability.None, leaveOpen: false);
            view = mapping.CreateViewAccessor(0, 0, MemoryMappedFileAccess.Read);

            byte* basePointer = null;
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref basePointer);
            pointerAcquired = true;
            // The view starts at a page boundary at or before offset 0; PointerOffset is that distance.
            byte* fileStart = basePointer + view.PointerOffset;

            var header = SafetensorsHeader.Parse(fullPath, fileStart, fileLength);
            return new SafetensorsFile(fullPath, fileLength, mapping, view, fileStart + sizeof(ulong) + header.HeaderLength, header);
        }
        catch
        {
            if (pointerAcquired) view!.SafeMemoryMappedViewHandle.ReleasePointer();
            view?.Dispose();
            mapping?.Dispose();
            stream.Dispose();
            throw;
        }
    }

    public bool Contains(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        return _entries.ContainsKey(name);
    }

    /// <summary>The tensor named <paramref name="name"/>.</summary>
    /// <exception cref="KeyNotFoundException">The file has no such tensor; the message names tensor and file.</exception>
    public TensorData Get(string name)
    {
        if (TryGet(name, out var tensor)) return tensor;
        throw new KeyNotFoundException($"{Path}: no tensor named '{name}' (the file holds {_entries.Count} tensors)");
    }

    public bool TryGet(string name, out TensorData tensor)
    {
        ArgumentNullException.ThrowIfNull(name);
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (!_entries.TryGetValue(name, out var entry))
        {
            tensor = default;
            return false;
        }

        // Hand out a copy of the shape so a caller cannot change what later callers see.
        tensor = new TensorData(name, entry.DType, (long[])entry.Shape.Clone(), _dataStart + entry.Begin, entry.End - entry.Begin, Path);
        return true;
    }

    /// <summary>Unmaps the file. Every <see cref="TensorData"/> obtained from it becomes invalid.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _view.SafeMemoryMappedViewHandle.ReleasePointer();
        _view.Dispose();
        _mapping.Dispose();
    }
}
