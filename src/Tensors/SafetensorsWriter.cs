using System.Buffers;
using System.Buffers.Binary;
using System.Text.Json;

namespace PaliGemma.CpuOnly.Tensors;

/// <summary>
/// Writes a <c>.safetensors</c> file: describe every tensor with <see cref="Add(string, DType, ReadOnlySpan{long}, ReadOnlySpan{byte})"/>
/// (bytes copied now) or <see cref="Add(string, DType, ReadOnlySpan{long}, Action{Stream})"/> (bytes streamed
/// during <see cref="WriteTo(Stream)"/>, for tensors too big to buffer), then write the header followed by the data.
/// </summary>
/// <remarks>
/// The data block is contiguous (no gaps, as the reference implementation requires). Tensors are laid out by
/// element size, largest first, keeping the order of <c>Add</c> within a size (the reference's layout); the header is padded
/// so the data starts at a multiple of 64 bytes in the file. So every tensor sits on a multiple of its element size.
/// With <see cref="AlignToCacheLines"/> the tensors whose byte length is a multiple of 64 go first, so each of them (every
/// weight matrix of a real model) starts on a 64-byte cache line of the file and of its memory mapping.
/// </remarks>
public sealed class SafetensorsWriter
{
    private const int CacheLine = 64;
    private readonly List<KeyValuePair<string, string>> _metadata = new();
    private readonly List<Pending> _tensors = new();
    private readonly HashSet<string> _names = new(StringComparer.Ordinal);

    private sealed record Pending(string Name, DType DType, long[] Shape, long ByteLength, byte[]? Data, Action<Stream>? WriteData);

    public SafetensorsWriter(IReadOnlyDictionary<string, string>? metadata = null)
    {
        if (metadata is null) return;
        foreach (var pair in metadata)
        {
            ArgumentNullException.ThrowIfNull(pair.Value, nameof(metadata));
            _metadata.Add(pair);
        }
    }

    /// <summary>
    /// Puts every tensor whose byte length is a multiple of 64 on a 64-byte boundary (they go first, the odd-sized rest after
    /// them). Vector loads of a mapped weight row then never straddle two cache lines, which decode pays for in bandwidth.
    /// Off by default, which keeps the reference implementation's tensor order.
    /// </summary>
    public bool AlignToCacheLines { get; init; }

    /// <summary>Number of tensors added so far.</summary>
    public int Count => _tensors.Count;

    /// <summary>Adds a tensor, copying <paramref name="data"/> (raw little-endian element bytes) into the writer.</summary>
    public void Add(string name, DType dtype, ReadOnlySpan<long> shape, ReadOnlySpan<byte> data)
    {
        long byteLength = CheckDescriptor(name, dtype, shape);
        if (data.Length != byteLength)
            throw new ArgumentException(
                $"tensor '{name}': {dtype.ToHeaderName()} {TensorData.FormatShape(shape)} needs {byteLength} bytes but {data.Length} were given", nameof(data));
        _tensors.Add(new Pending(name, dtype, shape.ToArray(), byteLength, data.ToArray(), null));
        _names.Add(name);
    }

    /// <summary>
    /// Adds a tensor whose bytes are produced later: <paramref name="writeData"/> is called once during
    /// <see cref="WriteTo(Stream)"/> and must write exactly the tensor's byte length to the stream it is given.
    /// </summary>
    public void Add(string name, DType dtype, ReadOnlySpan<long> shape, Action<Stream> writeData)
    {
        ArgumentNullException.ThrowIfNull(writeData);
        long byteLength = CheckDescriptor(name, dtype, shape);
        _tensors.Add(new Pending(name, dtype, shape.ToArray(), byteLength, null, writeData));
        _names.Add(name);
    }

    /// <summary>Writes the file, replacing <paramref name="path"/> only once it has been written completely.</summary>
    public void WriteTo(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        string fullPath = Path.GetFullPath(path);
        string temporary = fullPath + "." + Guid.NewGuid().ToString("N") + ".tmp";
        try
        {
            using (var stream = new FileStream(temporary, FileMode.CreateNew, FileAccess.Write, FileShare.None, bufferSize: 1 << 20))
            {
                WriteTo(stream);
            }
            File.Move(temporary, fullPath, overwrite: true);
        }
        catch
        {
            File.Delete(temporary);
            throw;
        }
    }

    /// <summary>Writes the 8-byte header length, the header and the data to <paramref name="stream"/>.</summary>
    public void WriteTo(Stream stream)
    {
        ArgumentNullException.ThrowIfNull(stream);
        bool lines = AlignToCacheLines;
        var ordered = _tensors.Select((t, i) => (Tensor: t, Index: i))
            .OrderBy(x => lines && x.Tensor.ByteLength % CacheLine != 0 ? 1 : 0)
            .ThenByDescending(static x => x.Tensor.DType.SizeOf())
            .ThenBy(static x => x.Index)
            .Select(static x => x.Tensor)
            .ToArray();

        byte[] header = BuildHeader(ordered);
        Span<byte> lengthPrefix = stackalloc byte[sizeof(ulong)];
        BinaryPrimitives.WriteUInt64LittleEndian(lengthPrefix, (ulong)header.Length);
        stream.Write(lengthPrefix);
        stream.Write(header);

        foreach (var tensor in ordered)
        {
            if (tensor.Data is not null)
            {
                stream.Write(tensor.Data);
                continue;
            }

            var counted = new ExactLengthStream(stream, tensor.ByteLength, tensor.Name);
            tensor.WriteData!(counted);
            if (counted.Written != tensor.ByteLength)
                throw new InvalidOperationException(
                    $"tensor '{tensor.Name}': the data callback wrote {counted.Written} bytes but {tensor.DType.ToHeaderName()} {TensorData.FormatShape(tensor.Shape)} needs {tensor.ByteLength}");
        }
        stream.Flush();
    }

    private long CheckDescriptor(string name, DType dtype, ReadOnlySpan<long> shape)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        if (name == SafetensorsHeader.MetadataKey)
            throw new ArgumentException($"'{SafetensorsHeader.MetadataKey}' is reserved and cannot name a tensor", nameof(name));
        if (_names.Contains(name))
            throw new ArgumentException($"tensor '{name}' was already added", nameof(name));
        long byteLength = dtype.SizeOf();
        foreach (long dim in shape)
        {
            if (dim < 0)
                throw new ArgumentException($"tensor '{name}': shape {TensorData.FormatShape(shape)} has a negative dimension", nameof(shape));
            byteLength = checked(byteLength * dim);
        }
        return byteLength;
    }

    private byte[] BuildHeader(Pending[] ordered)
    {
        var buffer = new ArrayBufferWriter<byte>();
        using (var json = new Utf8JsonWriter(buffer))
        {
            json.WriteStartObject();
            if (_metadata.Count > 0)
            {
                json.WriteStartObject(SafetensorsHeader.MetadataKey);
                foreach (var (key, value) in _metadata) json.WriteString(key, value);
                json.WriteEndObject();
            }

            long offset = 0;
            foreach (var tensor in ordered)
            {
                json.WriteStartObject(tensor.Name);
                json.WriteString("dtype", tensor.DType.ToHeaderName());
                json.WriteStartArray("shape");
                foreach (long dim in tensor.Shape) json.WriteNumberValue(dim);
                json.WriteEndArray();
                json.WriteStartArray("data_offsets");
                json.WriteNumberValue(offset);
                json.WriteNumberValue(offset + tensor.ByteLength);
                json.WriteEndArray();
                json.WriteEndObject();
                offset += tensor.ByteLength;
            }
            json.WriteEndObject();
        }

        // Pad with spaces (JSON whitespace) so the data block starts on a cache line of the file (and so of its mapping):
        // vector loads of a weight row then never straddle two lines, which costs memory bandwidth in decode.
        int padded = ((sizeof(ulong) + buffer.WrittenCount + CacheLine - 1) & ~(CacheLine - 1)) - sizeof(ulong);
        var header = new byte[padded];
        buffer.WrittenSpan.CopyTo(header);
        header.AsSpan(buffer.WrittenCount).Fill((byte)' ');
        return header;
    }

    /// <summary>Write-only pass-through that refuses to write past one tensor's byte length.</summary>
    private sealed class ExactLengthStream(Stream inner, long limit, string tensorName) : Stream
    {
        public long Written { get; private set; }

        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => throw new NotSupportedException();
        public override long Position
        {
            get => Written;
            set => throw new NotSupportedException();
        }

        public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));

        public override void Write(ReadOnlySpan<byte> buffer)
        {
            if (Written + buffer.Length > limit)
                throw new InvalidOperationException($"tensor '{tensorName}': the data callback wrote more than the {limit} bytes the tensor holds");
            inner.Write(buffer);
            Written += buffer.Length;
        }

        public override void WriteByte(byte value) => Write([value]);
        public override void Flush() => inner.Flush();
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
    }
}
