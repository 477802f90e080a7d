using System.Buffers.Binary;
using System.Text.Json;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Tests.Tensors;

public sealed unsafe class SafetensorsWriterTests
{
    private static byte[] Pattern(int length, int seed)
    {
        var bytes = new byte[length];
        new Random(seed).NextBytes(bytes);
        return bytes;
    }

    [Fact]
    public void WriteTo_RoundTripsEveryDTypeWithMetadata()
    {
        using var temp = new TempDirectory();
        var tensors = new (string Name, DType DType, long[] Shape)[]
        {
            ("u8", DType.U8, [3]),
            ("f32", DType.F32, [2, 3]),
            ("bf16", DType.BF16, [5]),
            ("f16", DType.F16, [1, 1, 3]),
            ("f64", DType.F64, [2]),
            ("i64", DType.I64, [1]),
            ("i32", DType.I32, [3]),
            ("i16", DType.I16, [3]),
            ("i8", DType.I8, [7]),
            ("bool", DType.Bool, [2, 2]),
            ("scalar", DType.F32, []),
            ("empty", DType.F32, [0, 4]),
        };
        var metadata = new Dictionary<string, string> { ["format"] = "pt", ["quote\"d"] = "ünïcode" };
        var writer = new SafetensorsWriter(metadata);
        var expected = new Dictionary<string, byte[]>();
        int seed = 0;
        foreach (var (name, dtype, shape) in tensors)
        {
            long count = shape.Aggregate(1L, (a, b) => a * b);
            var data = Pattern((int)(count * dtype.SizeOf()), seed++);
            writer.Add(name, dtype, shape, data);
            expected[name] = data;
        }
        Assert.Equal(tensors.Length, writer.Count);
        string path = temp.File("all.safetensors");
        writer.WriteTo(path);
        Assert.Empty(Directory.GetFiles(temp.Path, "*.tmp"));

        using var file = SafetensorsFile.Open(path);
        Assert.Equal(metadata, file.Metadata);
        Assert.Equal(tensors.Select(t => t.Name).Order(StringComparer.Ordinal), file.TensorNames.Order(StringComparer.Ordinal));
        foreach (var (name, dtype, shape) in tensors)
        {
            var tensor = file.Get(name);
            Assert.Equal(dtype, tensor.DType);
            Assert.Equal(shape, tensor.Shape);
            Assert.Equal(expected[name], tensor.Bytes.ToArray());
        }
    }

    [Fact]
    public void WriteTo_ProducesAContiguousAlignedLayout()
    {
        // The reference implementation rejects gaps in the data block; the kernels prefer aligned tensors.
        var writer = new SafetensorsWriter();
        writer.Add("byte", DType.U8, [3], new byte[3]);
        writer.Add("half", DType.BF16, [3], new byte[6]);
        writer.Add("float", DType.F32, [5], new byte[20]);
        writer.Add("double", DType.F64, [1], new byte[8]);
        using var stream = new MemoryStream();
        writer.WriteTo(stream);
        byte[] bytes = stream.ToArray();

        long headerLength = (long)BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        Assert.Equal(0, (8 + headerLength) % 64);   // the data block starts on a cache line
        long dataLength = bytes.Length - 8 - headerLength;
        using var header = JsonDocument.Parse(bytes.AsMemory(8, (int)headerLength));
        var spans = header.RootElement.EnumerateObject()
            .Select(p => (Size: DTypeInfo.Parse(p.Value.GetProperty("dtype").GetString()!)!.Value.SizeOf(),
                          Offsets: p.Value.GetProperty("data_offsets").EnumerateArray().Select(e => e.GetInt64()).ToArray()))
            .OrderBy(s => s.Offsets[0])
            .ToArray();
        long next = 0;
        foreach (var (size, offsets) in spans)
        {
            Assert.Equal(next, offsets[0]);
            Assert.Equal(0, (8 + headerLength + offsets[0]) % size);
            next = offsets[1];
        }
        Assert.Equal(dataLength, next);
    }

    [Fact]
    public void WriteTo_PutsCacheLineSizedTensorsOnCacheLines()
    {
        // Odd-sized tensors of one element size go after the ones whose length is a multiple of 64 bytes, so those all start on
        // a 64-byte boundary of the file, whatever order they were added in.
        var writer = new SafetensorsWriter { AlignToCacheLines = true };
        writer.Add("odd_a", DType.BF16, [7], new byte[14]);
        writer.Add("line_a", DType.BF16, [64], new byte[128]);
        writer.Add("odd_b", DType.F32, [3], new byte[12]);
        writer.Add("line_b", DType.F32, [48], new byte[192]);
        writer.Add("line_c", DType.BF16, [2, 32], new byte[128]);
        using var stream = new MemoryStream();
        writer.WriteTo(stream);
        byte[] bytes = stream.ToArray();
        long headerLength = (long)BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        using var header = JsonDocument.Parse(bytes.AsMemory(8, (int)headerLength));
        foreach (var name in new[] { "line_a", "line_b", "line_c" })
        {
            long start = header.RootElement.GetProperty(name).GetProperty("data_offsets")[0].GetInt64();
            Assert.True((8 + headerLength + start) % 64 == 0, $"{name} starts at file offset {8 + headerLength + start}");
        }
    }

    [Fact]
    public void WriteTo_GoldenCheckpointRewritten_IsTensorForTensorIdentical()
    {
        using var temp = new TempDirectory();
        using var golden = SafetensorsFile.Open(Path.Combine(TestPaths.Golden, "tiny-mqa-56", "model.safetensors"));
        var writer = new SafetensorsWriter(golden.Metadata);
        foreach (string name in golden.TensorNames)
        {
            var tensor = golden.Get(name);
            writer.Add(name, tensor.DType, tensor.Shape, tensor.Bytes);
        }
        string path = temp.File("copy.safetensors");
        writer.WriteTo(path);

        using var copy = SafetensorsFile.Open(path);
        Assert.Equal(golden.Metadata, copy.Metadata);
        Assert.Equal(golden.TensorNames, copy.TensorNames);
        foreach (string name in golden.TensorNames)
            Assert.True(golden.Get(name).Bytes.SequenceEqual(copy.Get(name).Bytes), name);
    }

    [Fact]
    public void Add_StreamedData_IsWrittenInPlace()
    {
        var writer = new SafetensorsWriter();
        writer.Add("first", DType.U8, [2], [9, 8]);
        writer.Add("streamed", DType.F32, [2, 2], stream =>
        {
            Span<byte> four = stackalloc byte[4];
            for (int i = 0; i < 4; i++)
            {
                BinaryPrimitives.WriteSingleLittleEndian(four, i + 0.5f);
                stream.Write(four);
            }
        });
        using var temp = new TempDirectory();
        string path = temp.File("streamed.safetensors");
        writer.WriteTo(path);

        using var file = SafetensorsFile.Open(path);
        Assert.Equal([0.5f, 1.5f, 2.5f, 3.5f], file.Get("streamed").ToFloatArray());
        Assert.Equal([9, 8], file.Get("first").Bytes.ToArray());
    }

    [Theory]
    [InlineData(15)]
    [InlineData(17)]
    public void Add_StreamedDataOfWrongLength_FailsAndLeavesNoFile(int written)
    {
        var writer = new SafetensorsWriter();
        writer.Add("w", DType.F32, [4], stream => stream.Write(new byte[written]));
        using var temp = new TempDirectory();
        string path = temp.File("bad.safetensors");
        var e = Assert.Throws<InvalidOperationException>(() => writer.WriteTo(path));
        Assert.Contains("'w'", e.Message);
        Assert.Empty(Directory.GetFiles(temp.Path));
    }

    [Fact]
    public void Add_InvalidDescriptors_Throw()
    {
        var writer = new SafetensorsWriter();
        writer.Add("w", DType.F32, [2], new byte[8]);
        Assert.Contains("already added", Assert.Throws<ArgumentException>(() => writer.Add("w", DType.F32, [2], new byte[8])).Message);
        Assert.Contains("needs 8 bytes but 7", Assert.Throws<ArgumentException>(() => writer.Add("x", DType.F32, [2], new byte[7])).Message);
        Assert.Contains("negative", Assert.Throws<ArgumentException>(() => writer.Add("y", DType.F32, [-2], new byte[8])).Message);
        Assert.Throws<ArgumentException>(() => writer.Add("__metadata__", DType.U8, [1], new byte[1]));
        Assert.Throws<ArgumentException>(() => writer.Add("", DType.U8, [1], new byte[1]));
        Assert.Equal(1, writer.Count);
    }
}
