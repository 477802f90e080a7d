using PaliGemma.CpuOnly.Model.Imaging;

namespace PaliGemma.CpuOnly.Tests.Imaging;

/// <summary>
/// Decoding and resizing against PIL on cases the golden samples do not reach: every JPEG chroma layout libjpeg-turbo
/// upsamples differently, progressive and restart-interval JPEGs, 16-bit PNG/TIFF, palette transparency, a GIF whose
/// first frame is smaller than its screen, and single-axis, extreme and 1x1 resizes. References: Data/*.npy, written
/// by Data/make_fixtures.py with PIL.
/// </summary>
public sealed class PilFixtureTests
{
    private const string ReferenceSuffix = ".rgb.npy";

    public static TheoryData<string> EncodedFixtures()
    {
        var data = new TheoryData<string>();
        foreach (string reference in Directory.GetFiles(GoldenImaging.FixtureDirectory, "*" + ReferenceSuffix).Order(StringComparer.Ordinal))
        {
            data.Add(Path.GetFileName(reference)[..^ReferenceSuffix.Length]);
        }

        return data;
    }

    public static TheoryData<string> ResizeFixtures()
    {
        var data = new TheoryData<string>();
        foreach (string reference in Directory.GetFiles(GoldenImaging.FixtureDirectory, "resize_*x*.npy").Order(StringComparer.Ordinal))
        {
            data.Add(Path.GetFileName(reference));
        }

        return data;
    }

    [Fact]
    public void Fixtures_ArePresent()
    {
        Assert.True(EncodedFixtures().Count >= 15, "expected the encoded fixtures from Data/make_fixtures.py");
        Assert.True(ResizeFixtures().Count >= 5, "expected the resize fixtures from Data/make_fixtures.py");
    }

    [Theory]
    [MemberData(nameof(EncodedFixtures))]
    public void Decode_EqualsPilConvertRgbExactly(string fileName)
    {
        string path = Path.Combine(GoldenImaging.FixtureDirectory, fileName);
        ImagingNpy reference = ImagingNpy.Read(path + ReferenceSuffix);

        RgbImage decoded = ImageLoader.Load(path);

        Assert.Equal(reference.Shape, new[] { decoded.Height, decoded.Width, 3 });
        byte[] expected = reference.AsUInt8();
        int first = Enumerable.Range(0, expected.Length).FirstOrDefault(i => expected[i] != decoded.Pixels[i], -1);
        Assert.True(first < 0,
            $"{fileName}: sample {first} (pixel {first / 3 % decoded.Width}, {first / 3 / decoded.Width}) is " +
            $"{(first < 0 ? 0 : decoded.Pixels[first])}, PIL gives {(first < 0 ? 0 : expected[first])}");
    }

    [Theory]
    [MemberData(nameof(ResizeFixtures))]
    public void Bicubic_EqualsPilResizeExactly(string fileName)
    {
        ImagingNpy source = ImagingNpy.Read(Path.Combine(GoldenImaging.FixtureDirectory, "resize_source.npy"));
        ImagingNpy reference = ImagingNpy.Read(Path.Combine(GoldenImaging.FixtureDirectory, fileName));
        var image = new RgbImage(source.Shape[1], source.Shape[0], source.AsUInt8());

        RgbImage resized = PilResize.Bicubic(image, reference.Shape[1], reference.Shape[0]);

        Assert.Equal(reference.AsUInt8(), resized.Pixels);
    }

    [Fact]
    public void SixteenBitGreyPng_ClampsLikePilInsteadOfScaling()
    {
        // make_fixtures.py puts 0, 255, 256 and 65535 at the start of grey16.png; PIL's I;16 -> RGB clamps at 255.
        RgbImage decoded = ImageLoader.Load(Path.Combine(GoldenImaging.FixtureDirectory, "grey16.png"));
        Assert.Equal(new byte[] { 0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255, 255 }, decoded.Pixels[..12]);
    }
}
