using System.IO.Compression;
using PaliGemma.CpuOnly.Model.Tasks;
using PaliGemma.CpuOnly.Tests.Tensors;
using Xunit.Abstractions;

namespace PaliGemma.CpuOnly.Tests.Tasks.Segmentation;

public sealed class MaskDecoderTests(ITestOutputHelper output)
{
    // The reference is PyTorch float32; a different summation order moves the mask by ~1e-6 (README: vs float64 1.4e-6).
    private const float Tolerance = 1e-5f;

    public static TheoryData<int> CaseIndices()
    {
        var data = new TheoryData<int>();
        for (int i = 0; i < SegmentationGolden.CaseCount; i++) data.Add(i);
        return data;
    }

    [Theory]
    [MemberData(nameof(CaseIndices))]
    public void Decode_GoldenCodes_MatchesTheReferenceMask(int caseIndex)
    {
        var @case = SegmentationGolden.Case(caseIndex);
        var expected = SegmentationGolden.ReadNpy(@case.GetProperty("mask64_file").GetString()!);
        Assert.Equal([64L, 64L], expected.Shape);

        float[] mask = SegmentationGolden.Decoder.Decode(SegmentationGolden.Codes(@case));

        float[] reference = expected.ToFloat32();
        float maxDiff = 0;
        for (int i = 0; i < reference.Length; i++) maxDiff = Math.Max(maxDiff, Math.Abs(mask[i] - reference[i]));
        output.WriteLine($"{@case.GetProperty("name").GetString()}: max |diff| = {maxDiff:E3}");
        Assert.Equal(reference.Length, mask.Length);
        Assert.True(maxDiff <= Tolerance, $"max |diff| {maxDiff:E3} exceeds {Tolerance:E0}");
    }

    [Fact]
    public void Decode_AllRowsOfCodesNpy_MatchMasks64Npy()
    {
        var codes = SegmentationGolden.ReadNpy(SegmentationGolden.Root.GetProperty("codes_file").GetString()!);
        var masks = SegmentationGolden.ReadNpy(SegmentationGolden.Root.GetProperty("masks64_file").GetString()!);
        long count = codes.Shape[0];
        Assert.Equal([count, 16L], codes.Shape);
        Assert.Equal([count, 64L, 64L], masks.Shape);
        int[] allCodes = codes.ToInt64().Select(c => (int)c).ToArray();
        float[] allMasks = masks.ToFloat32();

        // Decoding concurrently also checks that Decode shares no scratch state between calls.
        var decoded = new float[count][];
        Parallel.For(0, (int)count, i => decoded[i] = SegmentationGolden.Decoder.Decode(allCodes.AsSpan(i * 16, 16)));
        for (int i = 0; i < count; i++)
        {
            for (int p = 0; p < 64 * 64; p++)
                Assert.True(Math.Abs(decoded[i][p] - allMasks[i * 4096 + p]) <= Tolerance, $"mask {i} pixel {p}");
        }
    }

    [Fact]
    public void EmbeddingDim_IsReadFromTheCodebookShape()
    {
        Assert.Equal(SegmentationGolden.Root.GetProperty("embedding_dim").GetInt32(), SegmentationGolden.Decoder.EmbeddingDim);
    }

    [Fact]
    public void Load_DeflatedCopyWithoutEncoderArrays_DecodesIdentically()
    {
        using var temp = new TempDirectory();
        string path = temp.File("deflated.npz");
        SegmentationGolden.RewriteVae(path, (key, bytes) => key.StartsWith("encoder.", StringComparison.Ordinal) ? null : bytes, CompressionLevel.Optimal);
        using (var archive = ZipFile.OpenRead(path))
        {
            Assert.DoesNotContain(archive.Entries, e => e.FullName.StartsWith("encoder.", StringComparison.Ordinal));
            Assert.All(archive.Entries, e => Assert.True(e.CompressedLength < e.Length, $"{e.FullName} is not deflated"));
        }

        var decoder = MaskDecoder.Load(path);
        int[] codes = SegmentationGolden.Codes(SegmentationGolden.Case(2));
        Assert.Equal(SegmentationGolden.Decoder.Decode(codes), decoder.Decode(codes));
    }

    [Fact]
    public void Load_MissingFile_NamesThePathAndWhereToGetIt()
    {
        string path = Path.Combine(Path.GetTempPath(), "no-such-dir-" + Guid.NewGuid().ToString("N"), "vae-oid.npz");
        var e = Assert.Throws<FileNotFoundException>(() => MaskDecoder.Load(path));
        Assert.Contains(path, e.Message);
        Assert.Contains(MaskDecoder.DownloadHint, e.Message);
        Assert.Contains("https://storage.googleapis.com/big_vision/paligemma/vae-oid.npz", MaskDecoder.DownloadHint);
        Assert.Contains("--vae", MaskDecoder.DownloadHint);
    }

    [Theory]
    [InlineData("_vq_vae._embedding")]
    [InlineData("decoder.0.weight")]
    [InlineData("decoder.3.net.2.bias")]
    [InlineData("decoder.8.weight")]
    [InlineData("decoder.12.bias")]
    public void Load_MissingDecoderArray_NamesTheFileAndKey(string missingKey)
    {
        using var temp = new TempDirectory();
        string path = temp.File("partial.npz");
        SegmentationGolden.RewriteVae(path, (key, bytes) => key == missingKey ? null : bytes);
        var e = Assert.Throws<InvalidDataException>(() => MaskDecoder.Load(path));
        Assert.Contains(path, e.Message);
        Assert.Contains($"'{missingKey}'", e.Message);
    }

    [Theory]
    [InlineData("_vq_vae._embedding", new long[] { 127, 64 })]
    [InlineData("_vq_vae._embedding", new long[] { 128, 64, 1 })]
    [InlineData("_vq_vae._embedding", new long[] { 64, 128 })]
    [InlineData("decoder.0.weight", new long[] { 128, 32, 1, 1 })]
    [InlineData("decoder.6.weight", new long[] { 64, 128, 4, 4 })]
    [InlineData("decoder.2.net.0.weight", new long[] { 128, 128, 1, 3, 3 })]
    [InlineData("decoder.10.bias", new long[] { 32 })]
    public void Load_ArrayWithTheWrongShape_NamesTheFileKeyAndShape(string badKey, long[] shape)
    {
        using var temp = new TempDirectory();
        string path = temp.File("misshapen.npz");
        long count = shape.Aggregate(1L, (a, b) => a * b);
        SegmentationGolden.RewriteVae(path, (key, bytes) => key == badKey ? SegmentationGolden.Float32Npy(new float[count], shape) : bytes);
        var e = Assert.Throws<InvalidDataException>(() => MaskDecoder.Load(path));
        Assert.Contains(path, e.Message);
        Assert.Contains($"'{badKey}'", e.Message);
        Assert.Contains("[" + string.Join(", ", shape) + "]", e.Message);
    }

    [Fact]
    public void Load_IntegerArray_NamesTheFileAndKey()
    {
        using var temp = new TempDirectory();
        string path = temp.File("ints.npz");
        SegmentationGolden.RewriteVae(path, (key, bytes) =>
        {
            if (key != "decoder.12.bias") return bytes;
            using var stream = new MemoryStream();
            PaliGemma.CpuOnly.Tensors.Npy.WriteInt64(stream, [1], [1]);
            return stream.ToArray();
        });
        var e = Assert.Throws<InvalidDataException>(() => MaskDecoder.Load(path));
        Assert.Contains(path, e.Message);
        Assert.Contains("'decoder.12.bias'", e.Message);
    }

    [Fact]
    public void Load_NotAZipFile_NamesTheFile()
    {
        using var temp = new TempDirectory();
        string path = temp.File("garbage.npz");
        File.WriteAllBytes(path, "this is not a zip archive"u8.ToArray());
        var e = Assert.Throws<InvalidDataException>(() => MaskDecoder.Load(path));
        Assert.Contains(path, e.Message);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(15)]
    [InlineData(17)]
    public void Decode_WrongNumberOfCodes_Throws(int count)
    {
        var e = Assert.Throws<ArgumentException>(() => SegmentationGolden.Decoder.Decode(new int[count]));
        Assert.Contains("16", e.Message);
        Assert.Contains(count.ToString(System.Globalization.CultureInfo.InvariantCulture), e.Message);
    }

    [Theory]
    [InlineData(0, -1)]
    [InlineData(7, 128)]
    [InlineData(15, int.MaxValue)]
    public void Decode_CodeOutOfRange_Throws(int position, int value)
    {
        var codes = new int[16];
        codes[position] = value;
        var e = Assert.Throws<ArgumentException>(() => SegmentationGolden.Decoder.Decode(codes));
        Assert.Contains(value.ToString(System.Globalization.CultureInfo.InvariantCulture), e.Message);
        Assert.Contains("0..127", e.Message);
    }
}
