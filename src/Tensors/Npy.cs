using System.Buffers.Binary;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;

namespace PaliGemma.CpuOnly.Tensors;

/// <summary>
/// Reads and writes NumPy <c>.npy</c> files (format versions 1.0, 2.0 and 3.0) holding little-endian, C-order arrays
/// of the dtypes the reference data uses: <c>&lt;f4</c>, <c>&lt;f8</c>, <c>&lt;i8</c>, <c>&lt;i4</c>, <c>|u1</c>, <c>|b1</c>.
/// Read errors are <see cref="InvalidDataException"/>s that name the source.
/// </summary>
/// <remarks>Element bytes are reinterpreted in place, which assumes a little-endian machine (every .NET 10 target is).</remarks>
public static class Npy
{
    internal const string Float32Descr = "<f4";
    internal const string Float64Descr = "<f8";
    internal const string Int64Descr = "<i8";
    internal const string Int32Descr = "<i4";
    internal const string UInt8Descr = "|u1";
    internal const string BoolDescr = "|b1";

    private static ReadOnlySpan<byte> Magic => [0x93, (byte)'N', (byte)'U', (byte)'M', (byte)'P', (byte)'Y'];

    /// <summary>NumPy pads the header so the data starts on this boundary.</summary>
    private const int Alignment = 64;

    /// <summary>Caps the header we are willing to parse; real headers are well under 1 KiB.</summary>
    private const int MaxHeaderLength = 1 << 20;

    public static NpyArray Read(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1 << 16, FileOptions.SequentialScan);
        return Read(stream, path);
    }

    /// <summary>Reads one array from <paramref name="stream"/>, which must end right after the array data.</summary>
    /// <param name="sourceName">Used in error messages (usually the file name).</param>
    public static NpyArray Read(Stream stream, string sourceName)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentNullException.ThrowIfNull(sourceName);

        Span<byte> prelude = stackalloc byte[12];
        int got = ReadUpTo(stream, prelude[..8]);
        if (got < 8 || !prelude[..6].SequenceEqual(Magic))
            throw Invalid(sourceName, "not a .npy file (missing the \\x93NUMPY magic)");

        byte major = prelude[6];
        byte minor = prelude[7];
        int lengthFieldSize = major switch
        {
            1 => 2,
            2 or 3 => 4,
            _ => throw Invalid(sourceName, $".npy format version {major}.{minor} is not supported (1.0, 2.0 and 3.0 are)"),
        };
        if (ReadUpTo(stream, prelude.Slice(8, lengthFieldSize)) < lengthFieldSize)
            throw Invalid(sourceName, "file ends inside the header length");
        uint headerLength = lengthFieldSize == 2
            ? BinaryPrimitives.ReadUInt16LittleEndian(prelude.Slice(8, 2))
            : BinaryPrimitives.ReadUInt32LittleEndian(prelude.Slice(8, 4));
        if (headerLength > MaxHeaderLength)
            throw Invalid(sourceName, $"header length {headerLength} exceeds the {MaxHeaderLength}-byte limit");

        var headerBytes = new byte[headerLength];
        if (ReadUpTo(stream, headerBytes) < headerBytes.Length)
            throw Invalid(sourceName, $"file ends inside the {headerLength}-byte header");
        // Versions 1 and 2 store the header as latin-1, version 3 as UTF-8.
        string header = major == 3 ? Encoding.UTF8.GetString(headerBytes) : Encoding.Latin1.GetString(headerBytes);

        var (descr, fortranOrder, shape) = new HeaderParser(header, sourceName).Parse();
        if (fortranOrder)
            throw Invalid(sourceName, "Fortran-order arrays are not supported; save the array in C order");
        int itemSize = ItemSize(descr)
            ?? throw Invalid(sourceName, $"dtype '{descr}' is not supported (supported: <f4, <f8, <i8, <i4, |u1, |b1; little-endian only)");

        long byteCount = itemSize;
        try
        {
            foreach (long dim in shape) byteCount = checked(byteCount * dim);
        }
        catch (OverflowException)
        {
            throw Invalid(sourceName, $"shape {TensorData.FormatShape(shape)} is too large");
        }
        if (byteCount > Array.MaxLength)
            throw Invalid(sourceName, $"array {descr} {TensorData.FormatShape(shape)} needs {byteCount} bytes; more than one .NET array can hold");

        // When the length is known, check it before allocating so a corrupt shape cannot make us allocate gigabytes.
        if (stream.CanSeek)
        {
            long remaining = stream.Length - stream.Position;
            if (remaining < byteCount)
                throw Invalid(sourceName, $"data holds {remaining} bytes but {descr} {TensorData.FormatShape(shape)} needs {byteCount}");
        }

        var data = new byte[byteCount];
        int dataRead = ReadUpTo(stream, data);
        if (dataRead < data.Length)
            throw Invalid(sourceName, $"data holds {dataRead} bytes but {descr} {TensorData.FormatShape(shape)} needs {byteCount}");
        if (stream.ReadByte() >= 0)
            throw Invalid(sourceName, $"file has bytes after the {byteCount} data bytes of {descr} {TensorData.FormatShape(shape)}");

        return new NpyArray(descr, shape, data, sourceName);
    }

    public static void WriteFloat32(string path, ReadOnlySpan<float> data, ReadOnlySpan<long> shape)
    {
        using var stream = CreateFile(path);
        WriteFloat32(stream, data, shape);
    }

    public static void WriteFloat32(Stream stream, ReadOnlySpan<float> data, ReadOnlySpan<long> shape) =>
        Write(stream, Float32Descr, MemoryMarshal.AsBytes(data), data.Length, shape);

    public static void WriteInt64(string path, ReadOnlySpan<long> data, ReadOnlySpan<long> shape)
    {
        using var stream = CreateFile(path);
        WriteInt64(stream, data, shape);
    }

    public static void WriteInt64(Stream stream, ReadOnlySpan<long> data, ReadOnlySpan<long> shape) =>
        Write(stream, Int64Descr, MemoryMarshal.AsBytes(data), data.Length, shape);

    public static void WriteUInt8(string path, ReadOnlySpan<byte> data, ReadOnlySpan<long> shape)
    {
        using var stream = CreateFile(path);
        WriteUInt8(stream, data, shape);
    }

    public static void WriteUInt8(Stream stream, ReadOnlySpan<byte> data, ReadOnlySpan<long> shape) =>
        Write(stream, UInt8Descr, data, data.Length, shape);

    private static FileStream CreateFile(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        return new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, bufferSize: 1 << 16);
    }

    private static void Write(Stream stream, string descr, ReadOnlySpan<byte> bytes, long elementCount, ReadOnlySpan<long> shape)
    {
        ArgumentNullException.ThrowIfNull(stream);
        long count = 1;
        foreach (long dim in shape)
        {
            if (dim < 0)
                throw new ArgumentException($"shape {TensorData.FormatShape(shape)} has a negative dimension", nameof(shape));
            count = checked(count * dim);
        }
        if (count != elementCount)
            throw new ArgumentException($"shape {TensorData.FormatShape(shape)} has {count} elements but the data has {elementCount}", nameof(shape));

        var dict = new StringBuilder("{'descr': '").Append(descr).Append("', 'fortran_order': False, 'shape': (");
        for (int i = 0; i < shape.Length; i++)
        {
            if (i > 0) dict.Append(", ");
            dict.Append(shape[i].ToString(CultureInfo.InvariantCulture));
        }
        // A one-element tuple needs its trailing comma in Python syntax.
        dict.Append(shape.Length == 1 ? ",), }" : "), }");

        // Version 1 has a 2-byte header length; only a header longer than that (absurd ranks) needs version 2.
        string dictText = dict.ToString();
        int preludeLength = 10;
        byte[] header = PaddedHeader(dictText, preludeLength);
        if (header.Length > ushort.MaxValue)
        {
            preludeLength = 12;
            header = PaddedHeader(dictText, preludeLength);
        }

        Span<byte> prelude = stackalloc byte[12];
        Magic.CopyTo(prelude);
        prelude[6] = (byte)(preludeLength == 10 ? 1 : 2);
        prelude[7] = 0;
        if (preludeLength == 10) BinaryPrimitives.WriteUInt16LittleEndian(prelude[8..], (ushort)header.Length);
        else BinaryPrimitives.WriteUInt32LittleEndian(prelude[8..], (uint)header.Length);

        stream.Write(prelude[..preludeLength]);
        stream.Write(header);
        stream.Write(bytes);
    }

    /// <summary>The dict text padded with spaces and a final newline so the data starts on a 64-byte boundary.</summary>
    private static byte[] PaddedHeader(string dictText, int preludeLength)
    {
        int padding = (Alignment - (preludeLength + dictText.Length + 1) % Alignment) % Alignment;
        return Encoding.Latin1.GetBytes(dictText + new string(' ', padding) + "\n");
    }

    private static int? ItemSize(string descr) => descr switch
    {
        Float32Descr or Int32Descr => 4,
        Float64Descr or Int64Descr => 8,
        UInt8Descr or BoolDescr => 1,
        _ => null,
    };

    /// <summary>Reads until <paramref name="buffer"/> is full or the stream ends; returns the bytes read.</summary>
    private static int ReadUpTo(Stream stream, Span<byte> buffer)
    {
        int total = 0;
        while (total < buffer.Length)
        {
            int n = stream.Read(buffer[total..]);
            if (n == 0) break;
            total += n;
        }
        return total;
    }

    private static InvalidDataException Invalid(string source, string message) => new($"{source}: {message}");

    /// <summary>
    /// Parses the header, a Python dict literal such as
    /// <c>{'descr': '&lt;f4', 'fortran_order': False, 'shape': (2, 3), }</c>, without evaluating anything.
    /// </summary>
    private ref struct HeaderParser
    {
        private readonly string _text;
        private readonly string _source;
        private int _position;

        public HeaderParser(string text, string source)
        {
            _text = text;
            _source = source;
            _position = 0;
        }

        public (string Descr, bool FortranOrder, long[] Shape) Parse()
        {
            string? descr = null;
            bool? fortranOrder = null;
            long[]? shape = null;

            Expect('{');
            while (true)
            {
                SkipWhitespace();
                if (TryConsume('}')) break;
                string key = ReadString();
                Expect(':');
                switch (key)
                {
                    case "descr":
                        if (descr is not null) throw Error("key 'descr' appears twice");
                        SkipWhitespace();
                        if (Peek() is not ('\'' or '"'))
                            throw Error("descr must be a dtype string; structured dtypes are not supported");
                        descr = ReadString();
                        break;
                    case "fortran_order":
                        if (fortranOrder is not null) throw Error("key 'fortran_order' appears twice");
                        fortranOrder = ReadBool();
                        break;
                    case "shape":
                        if (shape is not null) throw Error("key 'shape' appears twice");
                        shape = ReadShape();
                        break;
                    default:
                        throw Error($"unexpected header key '{key}'");
                }

                SkipWhitespace();
                if (TryConsume('}')) break;
                Expect(',');
            }

            SkipWhitespace();
            if (_position != _text.Length) throw Error("text after the closing '}'");
            if (descr is null || fortranOrder is null || shape is null)
                throw Error("header must have the keys 'descr', 'fortran_order' and 'shape'");
            return (descr, fortranOrder.Value, shape);
        }

        private long[] ReadShape()
        {
            Expect('(');
            var dims = new List<long>(4);
            while (true)
            {
                SkipWhitespace();
                if (TryConsume(')')) return dims.ToArray();
                int start = _position;
                while (_position < _text.Length && char.IsAsciiDigit(_text[_position])) _position++;
                if (_position == start) throw Error("shape must be a tuple of non-negative integers");
                if (!long.TryParse(_text.AsSpan(start, _position - start), NumberStyles.None, CultureInfo.InvariantCulture, out long dim))
                    throw Error($"shape dimension {_text[start.._position]} is too large");
                dims.Add(dim);
                TryConsume('L'); // Python 2 long literals, as old NumPy wrote them.
                SkipWhitespace();
                if (TryConsume(')')) return dims.ToArray();
                Expect(',');
            }
        }

        private bool ReadBool()
        {
            SkipWhitespace();
            if (TryConsumeWord("True")) return true;
            if (TryConsumeWord("False")) return false;
            throw Error("fortran_order must be True or False");
        }

        private string ReadString()
        {
            SkipWhitespace();
            char quote = Peek();
            if (quote is not ('\'' or '"')) throw Error("expected a quoted string");
            int end = _text.IndexOf(quote, _position + 1);
            if (end < 0) throw Error("unterminated string");
            string value = _text[(_position + 1)..end];
            _position = end + 1;
            return value;
        }

        private void Expect(char c)
        {
            SkipWhitespace();
            if (!TryConsume(c)) throw Error($"expected '{c}'");
        }

        private bool TryConsume(char c)
        {
            if (_position < _text.Length && _text[_position] == c)
            {
                _position++;
                return true;
            }
            return false;
        }

        private bool TryConsumeWord(string word)
        {
            if (string.CompareOrdinal(_text, _position, word, 0, word.Length) != 0) return false;
            _position += word.Length;
            return true;
        }

        private readonly char Peek() => _position < _text.Length ? _text[_position] : '\0';

        private void SkipWhitespace()
        {
            while (_position < _text.Length && char.IsWhiteSpace(_text[_position])) _position++;
        }

        private readonly InvalidDataException Error(string problem) =>
            Invalid(_source, $"bad .npy header at character {_position}: {problem} (header: {_text.TrimEnd()})");
    }
}
