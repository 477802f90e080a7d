using System.Buffers.Binary;
using System.Text;
using System.Text.Json;

namespace PaliGemma.CpuOnly.Tensors;

/// <summary>
/// Parses and validates a safetensors header with <see cref="Utf8JsonReader"/> (no reflection, AOT-safe).
/// Every error is an <see cref="InvalidDataException"/> whose message starts with the file path.
/// </summary>
internal sealed unsafe class SafetensorsHeader
{
    /// <summary>Same cap as the reference implementation; stops a corrupt length from making us parse gigabytes.</summary>
    internal const long MaxHeaderLength = 100_000_000;

    internal const string MetadataKey = "__metadata__";

    internal readonly record struct Entry(DType DType, long[] Shape, long Begin, long End);

    private SafetensorsHeader(long headerLength)
    {
        HeaderLength = headerLength;
    }

    /// <summary>Length of the JSON text (without the 8-byte length prefix).</summary>
    public long HeaderLength { get; }

    public Dictionary<string, Entry> Entries { get; } = new(StringComparer.Ordinal);

    /// <summary>Names in header order.</summary>
    public List<string> Names { get; } = new();

    public Dictionary<string, string> Metadata { get; } = new(StringComparer.Ordinal);

    public static SafetensorsHeader Parse(string path, byte* fileStart, long fileLength)
    {
        ulong declaredLength = BinaryPrimitives.ReadUInt64LittleEndian(new ReadOnlySpan<byte>(fileStart, sizeof(ulong)));
        long available = fileLength - sizeof(ulong);
        if (declaredLength > (ulong)available)
            throw Invalid(path, $"header length {declaredLength} runs past the end of the file ({fileLength} bytes, so at most {available} header bytes)");
        if (declaredLength > MaxHeaderLength)
            throw Invalid(path, $"header length {declaredLength} exceeds the {MaxHeaderLength}-byte limit");
        if (declaredLength < 2)
            throw Invalid(path, $"header length {declaredLength} is too short for a JSON object");

        var header = new SafetensorsHeader((long)declaredLength);
        long dataLength = available - header.HeaderLength;
        var json = new ReadOnlySpan<byte>(fileStart + sizeof(ulong), (int)declaredLength);
        try
        {
            header.ReadRoot(path, json, dataLength);
        }
        catch (JsonException e)
        {
            throw Invalid(path, $"header is not valid JSON: {e.Message}");
        }

        header.CheckNoOverlap(path);
        return header;
    }

    private void ReadRoot(string path, ReadOnlySpan<byte> json, long dataLength)
    {
        // Writers pad the header with trailing spaces for alignment; the reader skips them as whitespace.
        var reader = new Utf8JsonReader(json, new JsonReaderOptions { CommentHandling = JsonCommentHandling.Disallow, MaxDepth = 8 });
        if (!reader.Read() || reader.TokenType != JsonTokenType.StartObject)
            throw Invalid(path, "header is not a JSON object");

        bool sawMetadata = false;
        while (true)
        {
            ReadOrThrow(ref reader, path);
            if (reader.TokenType == JsonTokenType.EndObject) break;

            string name = reader.GetString()!;
            ReadOrThrow(ref reader, path);
            if (name == MetadataKey)
            {
                if (sawMetadata) throw Invalid(path, $"'{MetadataKey}' appears twice in the header");
                sawMetadata = true;
                ReadMetadata(ref reader, path);
                continue;
            }

            if (Entries.ContainsKey(name))
                throw Invalid(path, $"tensor '{name}' appears twice in the header");
            var entry = ReadEntry(ref reader, path, name);
            Validate(path, name, entry, dataLength);
            Entries.Add(name, entry);
            Names.Add(name);
        }

        // With isFinalBlock the reader throws on anything but whitespace after the root object.
        if (reader.Read())
            throw Invalid(path, "header has content after the JSON object");
    }

    private void ReadMetadata(ref Utf8JsonReader reader, string path)
    {
        if (reader.TokenType != JsonTokenType.StartObject)
            throw Invalid(path, $"'{MetadataKey}' must be an object of string values, found {reader.TokenType}");
        while (true)
        {
            ReadOrThrow(ref reader, path);
            if (reader.TokenType == JsonTokenType.EndObject) return;
            string key = reader.GetString()!;
            ReadOrThrow(ref reader, path);
            if (reader.TokenType != JsonTokenType.String)
                throw Invalid(path, $"'{MetadataKey}' value of '{key}' must be a string, found {reader.TokenType}");
            if (!Metadata.TryAdd(key, reader.GetString()!))
                throw Invalid(path, $"'{MetadataKey}' key '{key}' appears twice");
        }
    }

    private static Entry ReadEntry(ref Utf8JsonReader reader, string path, string name)
    {
        if (reader.TokenType != JsonTokenType.StartObject)
            throw Invalid(path, $"tensor '{name}': header entry must be an object with dtype, shape and data_offsets, found {reader.TokenType}");

        DType? dtype = null;
        long[]? shape = null;
        long[]? offsets = null;
        while (true)
        {
            ReadOrThrow(ref reader, path);
            if (reader.TokenType == JsonTokenType.EndObject) break;
            string field = reader.GetString()!;
            ReadOrThrow(ref reader, path);
            switch (field)
            {
                case "dtype":
                    if (dtype is not null) throw Invalid(path, $"tensor '{name}' has two 'dtype' fields");
                    if (reader.TokenType != JsonTokenType.String)
                        throw Invalid(path, $"tensor '{name}': dtype must be a string, found {reader.TokenType}");
                    string dtypeName = reader.GetString()!;
                    dtype = DTypeInfo.Parse(dtypeName)
                        ?? throw Invalid(path, $"tensor '{name}' has unknown dtype '{dtypeName}' (known: F32, BF16, F16, F64, I64, I32, I16, I8, U8, BOOL)");
                    break;
                case "shape":
                    if (shape is not null) throw Invalid(path, $"tensor '{name}' has two 'shape' fields");
                    shape = ReadNonNegativeIntegers(ref reader, path, name, field);
                    break;
                case "data_offsets":
                    if (offsets is not null) throw Invalid(path, $"tensor '{name}' has two 'data_offsets' fields");
                    offsets = ReadNonNegativeIntegers(ref reader, path, name, field);
                    if (offsets.Length != 2)
                        throw Invalid(path, $"tensor '{name}': data_offsets must be [begin, end], found {offsets.Length} numbers");
                    break;
                default:
                    throw Invalid(path, $"tensor '{name}' has unknown header field '{field}'");
            }
        }

        if (dtype is null) throw Invalid(path, $"tensor '{name}' has no dtype");
        if (shape is null) throw Invalid(path, $"tensor '{name}' has no shape");
        if (offsets is null) throw Invalid(path, $"tensor '{name}' has no data_offsets");
        return new Entry(dtype.Value, shape, offsets[0], offsets[1]);
    }

    private static long[] ReadNonNegativeIntegers(ref Utf8JsonReader reader, string path, string name, string field)
    {
        if (reader.TokenType != JsonTokenType.StartArray)
            throw Invalid(path, $"tensor '{name}': {field} must be an array of non-negative integers, found {reader.TokenType}");
        var values = new List<long>(4);
        while (true)
        {
            ReadOrThrow(ref reader, path);
            if (reader.TokenType == JsonTokenType.EndArray) return values.ToArray();
            if (reader.TokenType != JsonTokenType.Number)
                throw Invalid(path, $"tensor '{name}': {field} must hold non-negative integers, found {reader.TokenType}");
            if (!reader.TryGetInt64(out long value) || value < 0)
                throw Invalid(path, $"tensor '{name}': {field} must hold non-negative integers, found {Encoding.UTF8.GetString(reader.ValueSpan)}");
            values.Add(value);
        }
    }

    private static void Validate(string path, string name, in Entry entry, long dataLength)
    {
        string offsetsText = $"[{entry.Begin}, {entry.End}]";
        if (entry.Begin > entry.End)
            throw Invalid(path, $"tensor '{name}' data_offsets {offsetsText} have begin after end");
        if (entry.End > dataLength)
            throw Invalid(path, $"tensor '{name}' data_offsets {offsetsText} run past the end of the data ({dataLength} bytes after the header)");

        long needed;
        try
        {
            needed = entry.DType.SizeOf();
            foreach (long dim in entry.Shape) needed = checked(needed * dim);
        }
        catch (OverflowException)
        {
            throw Invalid(path, $"tensor '{name}' shape {TensorData.FormatShape(entry.Shape)} is too large");
        }

        long held = entry.End - entry.Begin;
        if (held != needed)
            throw Invalid(path,
                $"tensor '{name}' data_offsets {offsetsText} hold {held} bytes but {entry.DType.ToHeaderName()} {TensorData.FormatShape(entry.Shape)} needs {needed}");
    }

    private void CheckNoOverlap(string path)
    {
        // Empty tensors own no bytes, so they cannot overlap anything.
        var spans = new List<(long Begin, long End, string Name)>(Names.Count);
        foreach (string name in Names)
        {
            var entry = Entries[name];
            if (entry.End > entry.Begin) spans.Add((entry.Begin, entry.End, name));
        }

        spans.Sort(static (a, b) => a.Begin != b.Begin ? a.Begin.CompareTo(b.Begin) : a.End.CompareTo(b.End));
        for (int i = 1; i < spans.Count; i++)
        {
            var previous = spans[i - 1];
            var current = spans[i];
            if (current.Begin < previous.End)
                throw Invalid(path,
                    $"tensors '{previous.Name}' [{previous.Begin}, {previous.End}] and '{current.Name}' [{current.Begin}, {current.End}] overlap");
        }
    }

    private static void ReadOrThrow(ref Utf8JsonReader reader, string path)
    {
        if (!reader.Read()) throw Invalid(path, "header is not valid JSON: it ends inside an object or array");
    }

    private static InvalidDataException Invalid(string path, string message) => new($"{path}: {message}");
}
