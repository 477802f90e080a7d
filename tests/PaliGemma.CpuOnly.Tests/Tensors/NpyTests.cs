using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using FsCheck;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Tests.Tensors;

public sealed class NpyTests
{
    public static TheoryData<string> GoldenNpyFiles()
    {
        var data = new TheoryData<string>();
        foreach (string path in Directory.EnumerateFiles(TestPaths.Golden, "*.npy", SearchOption.AllDirectories).Order(StringComparer.Ordinal))
            data.Add(Path.GetRelativePath(TestPaths.Golden, path));
        return data;
    }

    private static int ItemSize(string descr) => descr switch
    {
        "<f4" or "<i4" => 4,
        "<f8" or "<i8" => 8,
        "|u1" or "|b1" => 1,
        _ => throw new ArgumentException(descr),
    };

    [Theory]
    [MemberData(nameof(GoldenNpyFiles))]
    public void Read_GoldenFile_ShapeAndSizeMatchTheRawHeader(string relativePath)
    {
        string path = Path.Combine(TestPaths.Golden, relativePath);
        byte[] bytes = File.ReadAllBytes(path);
        // Oracle: the shape tuple and descr pulled out of the raw header text with a regex.
        string headerText = Encoding.Latin1.GetString(bytes, 10, BinaryPrimitives.ReadUInt16LittleEndian(bytes.AsSpan(8)));
        long[] expectedShape = Regex.Match(headerText, @"'shape': \(([^)]*)\)").Groups[1].Value
            .Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(long.Parse).ToArray();
        string expectedDescr = Regex.Match(headerText, @"'descr': '([^']*)'").Groups[1].Value;

        var array = Npy.Read(path);

        Assert.Equal(expectedDescr, array.DescrType);
        Assert.Equal(expectedShape, array.Shape);
        Assert.Equal(array.ElementCount * ItemSize(array.DescrType), array.Data.LongLength);
        Assert.Equal(bytes.AsSpan(bytes.Length - array.Data.Length).ToArray(), array.Data);
        Assert.Equal(path, array.SourceName);
    }

    public static TheoryData<string> CasesWithSamples => new() { "tiny-mqa-56", "small-mha-84", "long-448" };

    /// <summary>Each sample's arrays have the shapes its cases.json implies (batch, prompt length, generated length, config).</summary>
    [Theory]
    [MemberData(nameof(CasesWithSamples))]
    public void Read_GoldenSamples_HaveTheShapesAndIdsCasesJsonDescribes(string caseName)
    {
        string folder = Path.Combine(TestPaths.Golden, caseName);
        using var cases = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(folder, "cases.json")));
        var config = cases.RootElement.GetProperty("config_summary");
        long imageSize = config.GetProperty("image_size").GetInt64();
        long imageTokens = config.GetProperty("num_image_tokens").GetInt64();
        long vocab = config.GetProperty("vocab_size").GetInt64();
        long visionHidden = config.GetProperty("vision").GetProperty("hidden_size").GetInt64();
        long textHidden = config.GetProperty("text").GetProperty("hidden_size").GetInt64();
        long textLayers = config.GetProperty("text").GetProperty("num_hidden_layers").GetInt64();

        int checkedSamples = 0;
        foreach (var sample in cases.RootElement.GetProperty("samples").EnumerateArray())
        {
            if (!sample.TryGetProperty("input_ids_list", out var inputIdsList)) continue;
            long[][] inputIds = inputIdsList.EnumerateArray().Select(r => r.EnumerateArray().Select(e => e.GetInt64()).ToArray()).ToArray();
            long[][] generated = sample.GetProperty("generated_ids_list").EnumerateArray()
                .Select(r => r.EnumerateArray().Select(e => e.GetInt64()).ToArray()).ToArray();
            long batch = inputIds.Length;
            long prompt = inputIds[0].Length;
            long newTokens = generated[0].Length;

            var expectedShapes = new Dictionary<string, long[]>
            {
                ["input_ids"] = [batch, prompt],
                ["attention_mask"] = [batch, prompt],
                ["position_ids_generate_style"] = [batch, prompt],
                ["generated_ids"] = [batch, newTokens],
                ["full_sequences"] = [batch, prompt + newTokens],
                ["pixel_values"] = [batch, 3, imageSize, imageSize],
                ["resized_uint8_hwc"] = [batch, imageSize, imageSize, 3],
                ["vision_last_hidden_state"] = [batch, imageTokens, visionHidden],
                ["projector_output_unscaled"] = [batch, imageTokens, textHidden],
                ["image_features_scaled"] = [batch, imageTokens, textHidden],
                ["decoder_hidden_states"] = [textLayers + 1, batch, prompt, textHidden],
                ["prefix_logits"] = [batch, prompt, vocab],
                ["prefix_logits_generate_positions"] = [batch, prompt, vocab],
                ["prefix_logits_text_rows"] = [batch, prompt - imageTokens, vocab],
                ["step_logits"] = [batch, newTokens, vocab],
            };

            foreach (var file in sample.GetProperty("files").EnumerateObject())
            {
                var array = Npy.Read(Path.Combine(folder, file.Value.GetString()!));
                if (expectedShapes.TryGetValue(file.Name, out var shape))
                    Assert.True(shape.SequenceEqual(array.Shape), $"{file.Value.GetString()}: {TensorData.FormatShape(array.Shape)} != {TensorData.FormatShape(shape)}");
                else
                    Assert.StartsWith("decoded_rgb_uint8_hwc", file.Name); // image-sized: only the channel count is known
                if (file.Name.StartsWith("decoded_rgb", StringComparison.Ordinal) || file.Name.StartsWith("resized", StringComparison.Ordinal))
                {
                    Assert.Equal("|u1", array.DescrType);
                    Assert.Equal(3, array.Shape[^1]);
                }
            }

            var ids = Npy.Read(Path.Combine(folder, sample.GetProperty("files").GetProperty("input_ids").GetString()!));
            Assert.Equal(inputIds.SelectMany(r => r), ids.ToInt64());
            var full = Npy.Read(Path.Combine(folder, sample.GetProperty("files").GetProperty("full_sequences").GetString()!));
            Assert.Equal(inputIds.Zip(generated, (i, g) => i.Concat(g)).SelectMany(r => r), full.ToInt64());
            checkedSamples++;
        }
        Assert.True(checkedSamples >= 2);
    }

    [Theory]
    [InlineData(new long[0])]
    [InlineData(new long[] { 0 })]
    [InlineData(new long[] { 7 })]
    [InlineData(new long[] { 2, 3, 4 })]
    [InlineData(new long[] { 1, 0, 5 })]
    public void WriteFloat32_ThenRead_RoundTripsBitsAndShapeWithAlignedHeader(long[] shape)
    {
        int count = (int)shape.Aggregate(1L, (a, b) => a * b);
        float[] special = [float.NaN, -0f, float.Epsilon, float.MaxValue, float.NegativeInfinity, 1e-40f, 3.25f];
        var data = Enumerable.Range(0, count).Select(i => i < special.Length ? special[i] : i * 0.1f - 1).ToArray();
        using var stream = new MemoryStream();
        Npy.WriteFloat32(stream, data, shape);
        byte[] bytes = stream.ToArray();

        Assert.Equal(1, bytes[6]);
        int headerLength = BinaryPrimitives.ReadUInt16LittleEndian(bytes.AsSpan(8));
        Assert.Equal(0, (10 + headerLength) % 64);
        Assert.Equal((byte)'\n', bytes[10 + headerLength - 1]);

        stream.Position = 0;
        var array = Npy.Read(stream, "memory");
        Assert.Equal("<f4", array.DescrType);
        Assert.Equal(shape, array.Shape);
        Assert.Equal(data.Select(BitConverter.SingleToInt32Bits), array.ToFloat32().Select(BitConverter.SingleToInt32Bits));
    }

    [Fact]
    public void WriteFloat32_HeaderTextIsWhatNumPyWrites()
    {
        using var stream = new MemoryStream();
        Npy.WriteFloat32(stream, new float[6], [2, 3]);
        string header = Encoding.Latin1.GetString(stream.ToArray(), 10, BinaryPrimitives.ReadUInt16LittleEndian(stream.ToArray().AsSpan(8)));
        Assert.Equal("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", header.TrimEnd());

        stream.SetLength(0);
        Npy.WriteFloat32(stream, new float[5], [5]);
        header = Encoding.Latin1.GetString(stream.ToArray(), 10, BinaryPrimitives.ReadUInt16LittleEndian(stream.ToArray().AsSpan(8)));
        Assert.Equal("{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }", header.TrimEnd());
    }

    [Property(MaxTest = 200)]
    public bool WriteFloat32_ThenRead_RoundTripsArbitraryValues(float[] values, PositiveInt rows)
    {
        // Reshape to [rows, n / rows] when it divides, else keep one dimension.
        long[] shape = values.Length % rows.Get == 0 && values.Length > 0 ? [rows.Get, values.Length / rows.Get] : [values.Length];
        using var stream = new MemoryStream();
        Npy.WriteFloat32(stream, values, shape);
        stream.Position = 0;
        var array = Npy.Read(stream, "property");
        return array.Shape.SequenceEqual(shape)
            && array.ToFloat32().Select(BitConverter.SingleToInt32Bits).SequenceEqual(values.Select(BitConverter.SingleToInt32Bits));
    }

    [Fact]
    public void WriteInt64AndUInt8_ThroughFiles_RoundTrip()
    {
        using var temp = new TempDirectory();
        long[] ids = [long.MinValue, -100, 0, 2299, long.MaxValue, 1];
        Npy.WriteInt64(temp.File("ids.npy"), ids, [2, 3]);
        var readIds = Npy.Read(temp.File("ids.npy"));
        Assert.Equal("<i8", readIds.DescrType);
        Assert.Equal([2L, 3L], readIds.Shape);
        Assert.Equal(ids, readIds.ToInt64());

        byte[] pixels = [0, 1, 127, 128, 255, 3];
        Npy.WriteUInt8(temp.File("pixels.npy"), pixels, [1, 2, 3]);
        var readPixels = Npy.Read(temp.File("pixels.npy"));
        Assert.Equal("|u1", readPixels.DescrType);
        Assert.Equal(pixels, readPixels.ToUInt8());
        Assert.Equal(pixels.Select(p => (long)p), readPixels.ToInt64());
    }

    [Fact]
    public void Write_ShapeNotMatchingData_Throws()
    {
        using var stream = new MemoryStream();
        Assert.Contains("6 elements but the data has 5", Assert.Throws<ArgumentException>(() => Npy.WriteFloat32(stream, new float[5], [2, 3])).Message);
        Assert.Contains("negative", Assert.Throws<ArgumentException>(() => Npy.WriteInt64(stream, new long[1], [-1, -1])).Message);
    }

    /// <summary>Builds a .npy by hand: magic, version, length field of the version's width, header text, data.</summary>
    private static byte[] Build(int major, string header, byte[] data, bool pad = true)
    {
        int prelude = major == 1 ? 10 : 12;
        if (pad) header += new string(' ', (64 - (prelude + header.Length + 1) % 64) % 64) + "\n";
        byte[] headerBytes = major == 3 ? Encoding.UTF8.GetBytes(header) : Encoding.Latin1.GetBytes(header);
        using var stream = new MemoryStream();
        stream.Write([0x93, (byte)'N', (byte)'U', (byte)'M', (byte)'P', (byte)'Y', (byte)major, 0]);
        if (major == 1) stream.Write(BitConverter.GetBytes((ushort)headerBytes.Length));
        else stream.Write(BitConverter.GetBytes((uint)headerBytes.Length));
        stream.Write(headerBytes);
        stream.Write(data);
        return stream.ToArray();
    }

    private static NpyArray ReadBytes(byte[] bytes, string name = "built.npy") => Npy.Read(new MemoryStream(bytes), name);

    [Theory]
    [InlineData(1, "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }")]
    [InlineData(2, "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }")]
    [InlineData(3, "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }")]
    [InlineData(1, "{\"descr\": \"<i4\", \"shape\": (3L,), \"fortran_order\": False}")]
    [InlineData(1, "{'descr':'<i4','fortran_order':False,'shape':(3 , )}")]
    public void Read_HeaderVariants_AreAccepted(int major, string header)
    {
        var data = new byte[12];
        BinaryPrimitives.WriteInt32LittleEndian(data, -5);
        BinaryPrimitives.WriteInt32LittleEndian(data.AsSpan(4), 7);
        BinaryPrimitives.WriteInt32LittleEndian(data.AsSpan(8), int.MaxValue);
        var array = ReadBytes(Build(major, header, data));
        Assert.Equal([3L], array.Shape);
        Assert.Equal([-5L, 7, int.MaxValue], array.ToInt64());
    }

    [Fact]
    public void Read_Float64_ConvertsToFloat32AndBoolToInt64()
    {
        var doubles = new byte[16];
        BinaryPrimitives.WriteDoubleLittleEndian(doubles, 0.1);
        BinaryPrimitives.WriteDoubleLittleEndian(doubles.AsSpan(8), -2.5);
        var array = ReadBytes(Build(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", doubles));
        Assert.Equal([0.1f, -2.5f], array.ToFloat32());

        var bools = ReadBytes(Build(1, "{'descr': '|b1', 'fortran_order': False, 'shape': (2, 2), }", [1, 0, 0, 1]));
        Assert.Equal([1L, 0, 0, 1], bools.ToInt64());
        Assert.Equal([1, 0, 0, 1], bools.ToUInt8());
    }

    [Fact]
    public void Conversions_FromTheWrongDType_ThrowNamingSourceAndDType()
    {
        var ids = ReadBytes(Build(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }", new byte[8]), "ids.npy");
        var e = Assert.Throws<InvalidOperationException>(() => ids.ToFloat32());
        Assert.Contains("ids.npy", e.Message);
        Assert.Contains("'<i8'", e.Message);
        Assert.Throws<InvalidOperationException>(() => ids.ToUInt8());
        var floats = ReadBytes(Build(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", new byte[4]));
        Assert.Throws<InvalidOperationException>(() => floats.ToInt64());
    }

    public static TheoryData<string, byte[], string> CorruptFiles => new()
    {
        { "bad magic", Encoding.ASCII.GetBytes("NUMPY\x01\x00\x10\x00{}"), "not a .npy file" },
        { "empty", [], "not a .npy file" },
        { "version 4", Build(4, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", new byte[4]), "version 4.0 is not supported" },
        { "cut in header", Build(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", [])[..30], "ends inside the" },
        { "fortran order", Build(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", new byte[16]), "Fortran-order" },
        { "big endian", Build(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }", new byte[4]), "dtype '>f4' is not supported" },
        { "complex", Build(1, "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }", new byte[8]), "dtype '<c8' is not supported" },
        { "structured", Build(1, "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }", new byte[4]), "structured dtypes" },
        { "truncated data", Build(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", new byte[20]), "data holds 20 bytes but <f4 [2, 3] needs 24" },
        { "trailing data", Build(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", new byte[8]), "bytes after the 4 data bytes" },
        { "missing key", Build(1, "{'descr': '<f4', 'shape': (1,), }", new byte[4]), "must have the keys" },
        { "unknown key", Build(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'extra': 1}", new byte[4]), "unexpected header key 'extra'" },
        { "negative dim", Build(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }", new byte[4]), "non-negative integers" },
        { "not a dict", Build(1, "['<f4', False, (1,)]", new byte[4]), "expected '{'" },
        { "shape larger than file", Build(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (100000000,), }", new byte[8]), "data holds 8 bytes but <f8 [100000000] needs 800000000" },
        { "huge shape", Build(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", []), "too large" },
    };

    [Theory]
    [MemberData(nameof(CorruptFiles))]
    public void Read_CorruptFile_ThrowsInvalidDataNamingSource(string caseName, byte[] bytes, string fragment)
    {
        string source = caseName.Replace(' ', '_') + ".npy";
        var e = Assert.Throws<InvalidDataException>(() => ReadBytes(bytes, source));
        Assert.StartsWith(source + ":", e.Message);
        Assert.Contains(fragment, e.Message);
    }

    /// <summary>Hides the length of a stream, as a network or decompression stream would.</summary>
    private sealed class ForwardOnlyStream(Stream inner) : Stream
    {
        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => false;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override int Read(byte[] buffer, int offset, int count) => inner.Read(buffer, offset, Math.Min(count, 7));
        public override void Flush() { }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }

    [Fact]
    public void Read_ForwardOnlyStreamInSmallPieces_ReadsAndDetectsTruncationAndTrailingBytes()
    {
        var data = new byte[24];
        for (int i = 0; i < data.Length; i++) data[i] = (byte)i;
        const string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        var array = Npy.Read(new ForwardOnlyStream(new MemoryStream(Build(1, header, data))), "stream");
        Assert.Equal(data, array.Data);

        var cut = Assert.Throws<InvalidDataException>(() => Npy.Read(new ForwardOnlyStream(new MemoryStream(Build(1, header, data[..20]))), "stream"));
        Assert.Contains("data holds 20 bytes but <f4 [2, 3] needs 24", cut.Message);
        var extra = Assert.Throws<InvalidDataException>(() => Npy.Read(new ForwardOnlyStream(new MemoryStream(Build(1, header, [.. data, 0]))), "stream"));
        Assert.Contains("bytes after the 24 data bytes", extra.Message);
    }

    [Fact]
    public void Read_CorruptFileOnDisk_MessageNamesThePath()
    {
        using var temp = new TempDirectory();
        string path = temp.File("broken.npy");
        File.WriteAllBytes(path, Build(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", new byte[3]));
        var e = Assert.Throws<InvalidDataException>(() => Npy.Read(path));
        Assert.Contains(path, e.Message);
    }
}
