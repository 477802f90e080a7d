using System.Buffers.Binary;
using System.Text.Json;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Tests.Tensors;

public sealed unsafe class SafetensorsFileTests
{
    private static string GoldenF32 => Path.Combine(TestPaths.Golden, "tiny-mqa-56", "model.safetensors");
    private static string GoldenBF16 => Path.Combine(TestPaths.Golden, "tiny-mqa-56", "bf16", "model.safetensors");

    /// <summary>A header entry as read by System.Text.Json's DOM: an oracle independent of the reader under test.</summary>
    private sealed record OracleEntry(string DType, long[] Shape, long Begin, long End);

    private static (Dictionary<string, OracleEntry> Entries, Dictionary<string, string> Metadata, long DataStart) ParseWithDom(string path)
    {
        byte[] bytes = File.ReadAllBytes(path);
        long headerLength = (long)BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        using var document = JsonDocument.Parse(bytes.AsMemory(8, (int)headerLength));
        var entries = new Dictionary<string, OracleEntry>();
        var metadata = new Dictionary<string, string>();
        foreach (var property in document.RootElement.EnumerateObject())
        {
            if (property.Name == "__metadata__")
            {
                foreach (var m in property.Value.EnumerateObject()) metadata[m.Name] = m.Value.GetString()!;
                continue;
            }
            var offsets = property.Value.GetProperty("data_offsets").EnumerateArray().Select(e => e.GetInt64()).ToArray();
            entries[property.Name] = new OracleEntry(
                property.Value.GetProperty("dtype").GetString()!,
                property.Value.GetProperty("shape").EnumerateArray().Select(e => e.GetInt64()).ToArray(),
                offsets[0],
                offsets[1]);
        }
        return (entries, metadata, 8 + headerLength);
    }

    [Theory]
    [InlineData("tiny-mqa-56/model.safetensors")]
    [InlineData("tiny-mqa-56/bf16/model.safetensors")]
    [InlineData("small-mha-84/model.safetensors")]
    [InlineData("long-448/model.safetensors")]
    public void Open_GoldenCheckpoint_MatchesIndependentHeaderParseAndFileBytes(string relativePath)
    {
        string path = Path.Combine(TestPaths.Golden, relativePath);
        var (expected, metadata, dataStart) = ParseWithDom(path);
        byte[] fileBytes = File.ReadAllBytes(path);

        using var file = SafetensorsFile.Open(path);

        Assert.Equal(Path.GetFullPath(path), file.Path);
        Assert.Equal(fileBytes.Length, file.FileLength);
        Assert.Equal(metadata, file.Metadata);
        Assert.Equal(expected.Keys.Order(StringComparer.Ordinal), file.TensorNames.Order(StringComparer.Ordinal));
        Assert.True(expected.Count > 10);
        foreach (var (name, entry) in expected)
        {
            Assert.True(file.Contains(name));
            var tensor = file.Get(name);
            Assert.Equal(name, tensor.Name);
            Assert.Equal(entry.DType, tensor.DType.ToHeaderName());
            Assert.Equal(entry.Shape, tensor.Shape);
            Assert.Equal(entry.End - entry.Begin, tensor.ByteLength);
            Assert.Equal(file.Path, tensor.Source);
            Assert.True(tensor.Bytes.SequenceEqual(fileBytes.AsSpan((int)(dataStart + entry.Begin), (int)tensor.ByteLength)), name);
        }
    }

    [Fact]
    public void Open_GoldenBF16_HoldsTheF32WeightsRoundedToNearestEven()
    {
        using var f32 = SafetensorsFile.Open(GoldenF32);
        using var bf16 = SafetensorsFile.Open(GoldenBF16);

        Assert.Equal(f32.TensorNames.Order(StringComparer.Ordinal), bf16.TensorNames.Order(StringComparer.Ordinal));
        foreach (string name in f32.TensorNames)
        {
            var wide = f32.Get(name);
            var narrow = bf16.Get(name);
            Assert.Equal(DType.F32, wide.DType);
            Assert.Equal(DType.BF16, narrow.DType);
            Assert.Equal(wide.Shape, narrow.Shape);
            var wideBits = new ReadOnlySpan<uint>(wide.Pointer, (int)wide.ElementCount);
            var narrowBits = new ReadOnlySpan<ushort>(narrow.Pointer, (int)narrow.ElementCount);
            for (int i = 0; i < wideBits.Length; i++)
            {
                uint bits = wideBits[i];
                uint roundedToNearestEven = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
                Assert.True(roundedToNearestEven == narrowBits[i], $"{name}[{i}]: f32 0x{bits:X8} bf16 0x{narrowBits[i]:X4}");
            }
        }
    }

    [Fact]
    public void Get_MissingTensor_ThrowsKeyNotFoundNamingTensorAndFile()
    {
        using var file = SafetensorsFile.Open(GoldenF32);
        var e = Assert.Throws<KeyNotFoundException>(() => file.Get("no.such.weight"));
        Assert.Contains("'no.such.weight'", e.Message);
        Assert.Contains("model.safetensors", e.Message);
        Assert.False(file.TryGet("no.such.weight", out _));
        Assert.False(file.Contains("no.such.weight"));
    }

    [Fact]
    public void Get_ReturnsAFreshShapeArray_SoCallersCannotCorruptTheHeader()
    {
        using var file = SafetensorsFile.Open(GoldenF32);
        string name = file.TensorNames.First();
        var first = file.Get(name);
        long original = first.Shape[0];
        first.Shape[0] = original + 1;
        Assert.Equal(original, file.Get(name).Shape[0]);
    }

    [Fact]
    public void Dispose_ThenTryGet_ThrowsObjectDisposed()
    {
        var file = SafetensorsFile.Open(GoldenF32);
        string name = file.TensorNames.First();
        file.Dispose();
        file.Dispose();
        Assert.Throws<ObjectDisposedException>(() => file.TryGet(name, out _));
    }

    [Fact]
    public void Open_MissingFile_ThrowsFileNotFoundNamingIt()
    {
        using var temp = new TempDirectory();
        string path = temp.File("absent.safetensors");
        var e = Assert.Throws<FileNotFoundException>(() => SafetensorsFile.Open(path));
        Assert.Contains("absent.safetensors", e.Message);
    }

    [Fact]
    public void Open_ValidEdgeCases_ScalarEmptyTensorGapsPaddingAndUnicodeNames()
    {
        using var temp = new TempDirectory();
        var data = new byte[4 + 8 + 4];
        BinaryPrimitives.WriteSingleLittleEndian(data, 1.5f);
        BinaryPrimitives.WriteInt64LittleEndian(data.AsSpan(8), -7);
        // Scalar F32 at [0,4), a 4-byte gap, I64 [1] at [8,16), an empty tensor and a unicode name.
        string header = """
            {"__metadata__":{"format":"pt","note":"caf\u00e9"},
             "scalar":{"dtype":"F32","shape":[],"data_offsets":[0,4]},
             "empty":{"dtype":"BF16","shape":[0,3],"data_offsets":[8,8]},
             "gr\u00fc\u00dfe":{"dtype":"I64","shape":[1],"data_offsets":[8,16]}}
            """ + "        ";
        string path = temp.WriteRawSafetensors("edge.safetensors", header, data);

        using var file = SafetensorsFile.Open(path);
        Assert.Equal(["scalar", "empty", "grüße"], file.TensorNames);
        Assert.Equal("café", file.Metadata["note"]);
        var scalar = file.Get("scalar");
        Assert.Empty(scalar.Shape);
        Assert.Equal(1, scalar.ElementCount);
        Assert.Equal(1.5f, scalar.ToFloatArray()[0]);
        Assert.Equal(0, file.Get("empty").ByteLength);
        Assert.Equal(-7L, BinaryPrimitives.ReadInt64LittleEndian(file.Get("grüße").Bytes));
    }

    public static TheoryData<string, string, string, string> CorruptHeaders => new()
    {
        // name, header JSON, expected message fragment, tensor the message must name ("" = none)
        { "bad JSON", """{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]""", "not valid JSON", "" },
        { "not an object", "[1, 2, 3]", "not a JSON object", "" },
        { "trailing content", """{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} x""", "not valid JSON", "" },
        { "unknown dtype", """{"w":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}}""", "unknown dtype 'F8_E4M3'", "w" },
        { "offsets out of bounds", """{"w":{"dtype":"F32","shape":[16],"data_offsets":[0,64]}}""", "run past the end of the data (48 bytes", "w" },
        { "begin after end", """{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}}""", "begin after end", "w" },
        { "size mismatch", """{"x.weight":{"dtype":"F32","shape":[3,4],"data_offsets":[0,10]}}""",
            "tensor 'x.weight' data_offsets [0, 10] hold 10 bytes but F32 [3, 4] needs 48", "x.weight" },
        { "overlap", """{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[12,28]}}""",
            "overlap", "b" },
        { "contained overlap", """{"a":{"dtype":"U8","shape":[40],"data_offsets":[0,40]},"b":{"dtype":"U8","shape":[4],"data_offsets":[40,44]},"c":{"dtype":"U8","shape":[2],"data_offsets":[10,12]}}""",
            "overlap", "c" },
        { "negative dimension", """{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}""", "non-negative integers, found -1", "w" },
        { "fractional dimension", """{"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}""", "non-negative integers, found 1.5", "w" },
        { "huge shape", """{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}""", "too large", "w" },
        { "three offsets", """{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}""", "[begin, end]", "w" },
        { "missing offsets", """{"w":{"dtype":"F32","shape":[1]}}""", "no data_offsets", "w" },
        { "missing dtype", """{"w":{"shape":[1],"data_offsets":[0,4]}}""", "no dtype", "w" },
        { "unknown field", """{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"stride":[1]}}""", "unknown header field 'stride'", "w" },
        { "entry not an object", """{"w":[1,2]}""", "must be an object", "w" },
        { "duplicate tensor", """{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}""",
            "appears twice", "w" },
        { "metadata not strings", """{"__metadata__":{"total":3}}""", "must be a string", "" },
    };

    [Theory]
    [MemberData(nameof(CorruptHeaders))]
    public void Open_CorruptHeader_ThrowsInvalidDataNamingFileAndTensor(string caseName, string header, string fragment, string tensor)
    {
        using var temp = new TempDirectory();
        string fileName = caseName.Replace(' ', '_') + ".safetensors";
        string path = temp.WriteRawSafetensors(fileName, header, new byte[48]);

        var e = Assert.Throws<InvalidDataException>(() => SafetensorsFile.Open(path));
        Assert.Contains(fileName, e.Message);
        Assert.Contains(fragment, e.Message);
        if (tensor.Length > 0) Assert.Contains($"'{tensor}'", e.Message);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(5)]
    public void Open_FileShorterThanTheLengthPrefix_ThrowsInvalidData(int length)
    {
        using var temp = new TempDirectory();
        string path = temp.File("short.safetensors");
        File.WriteAllBytes(path, new byte[length]);
        var e = Assert.Throws<InvalidDataException>(() => SafetensorsFile.Open(path));
        Assert.Contains("short.safetensors", e.Message);
        Assert.Contains($"file is {length} bytes", e.Message);
    }

    [Fact]
    public void Open_TruncatedHeader_ThrowsInvalidData()
    {
        using var temp = new TempDirectory();
        string header = """{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""";
        // The prefix promises the full header but the file is cut in the middle of it.
        string path = temp.WriteRawSafetensors("cut.safetensors", header[..20], [], declaredHeaderLength: (ulong)header.Length);
        var e = Assert.Throws<InvalidDataException>(() => SafetensorsFile.Open(path));
        Assert.Contains("cut.safetensors", e.Message);
        Assert.Contains($"header length {header.Length} runs past the end of the file", e.Message);
    }

    [Theory]
    [InlineData(1UL << 40)]
    [InlineData(ulong.MaxValue)]
    public void Open_HeaderLengthPastEndOfFile_ThrowsInvalidData(ulong declared)
    {
        using var temp = new TempDirectory();
        string path = temp.WriteRawSafetensors("huge.safetensors", "{}", new byte[16], declared);
        var e = Assert.Throws<InvalidDataException>(() => SafetensorsFile.Open(path));
        Assert.Contains("huge.safetensors", e.Message);
        Assert.Contains($"header length {declared} runs past the end of the file", e.Message);
    }

    [Fact]
    public void Open_TensorBeyond4GiB_UsesLongOffsets()
    {
        // A sparse file: a 4-byte tensor placed past the 4 GiB mark, with a marker value at its position.
        // NTFS would zero-fill the 5 GiB (slow, and needs the disk space), so this runs where files can be sparse.
        if (OperatingSystem.IsWindows()) return;
        using var temp = new TempDirectory();
        const long begin = (5L << 30) + 12;
        string header = $$$"""{"small":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"far":{"dtype":"F32","shape":[1],"data_offsets":[{{{begin}}},{{{begin + 4}}}]}}""";
        string path = temp.WriteRawSafetensors("large.safetensors", header, [1, 2, 3, 4]);
        long dataStart = 8 + header.Length;
        using (var stream = new FileStream(path, FileMode.Open, FileAccess.Write))
        {
            stream.SetLength(dataStart + begin + 4);
            stream.Position = dataStart + begin;
            Span<byte> marker = stackalloc byte[4];
            BinaryPrimitives.WriteSingleLittleEndian(marker, 42.25f);
            stream.Write(marker);
        }

        using var file = SafetensorsFile.Open(path);
        var far = file.Get("far");
        Assert.Equal(4, far.ByteLength);
        Assert.Equal(42.25f, far.ToFloatArray()[0]);
        Assert.Equal([1, 2, 3, 4], file.Get("small").Bytes.ToArray());
    }
}
