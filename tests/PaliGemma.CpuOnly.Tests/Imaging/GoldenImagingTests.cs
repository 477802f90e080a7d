using PaliGemma.CpuOnly.Model.Imaging;
using Xunit.Abstractions;

namespace PaliGemma.CpuOnly.Tests.Imaging;

/// <summary>
/// Decoding, PIL bicubic resizing and rescale/normalise against the transformers 4.45.1 references in tests/golden,
/// for every image every golden sample feeds to the processor.
/// </summary>
public sealed class GoldenImagingTests(ITestOutputHelper output)
{
    private static readonly Dictionary<string, GoldenImage> s_images =
        GoldenImaging.AllImages().ToDictionary(image => image.ToString());

    public static TheoryData<string> PngImagesWithResizedReference => Ids(image => !image.IsJpeg && image.ResizedFile is not null);

    public static TheoryData<string> JpegImages => Ids(image => image.IsJpeg);

    public static TheoryData<string> AllImages => Ids(_ => true);

    [Fact]
    public void GoldenSamples_CoverPngJpegGreyRgbaAndBatches()
    {
        // Guards the theories below against silently running on nothing.
        var images = s_images.Values.ToList();
        Assert.Contains(images, image => image.IsJpeg && image.DecodedFile is not null);
        Assert.Contains(images, image => image.ImageFile.EndsWith("gray_200x150.png", StringComparison.Ordinal));
        Assert.Contains(images, image => image.ImageFile.EndsWith("rgba_300x200.png", StringComparison.Ordinal));
        Assert.Contains(images, image => image.BatchSize == 2 && image.Index == 1);
        Assert.All(images.Where(image => image.IsJpeg), image => Assert.NotNull(image.DecodedFile));
        Assert.Equal(GoldenImaging.Cases.Length, images.Select(image => image.Case).Distinct().Count());
    }

    [Theory]
    [MemberData(nameof(PngImagesWithResizedReference))]
    public void Png_DecodeThenResize_EqualsGoldenResizedExactly(string id)
    {
        GoldenImage golden = s_images[id];
        Assert.NotNull(golden.ResizedFile);
        RgbImage decoded = ImageLoader.Load(golden.ImageFile);
        RgbImage resized = PilResize.Bicubic(decoded, golden.Size, golden.Size);
        AssertPixelsEqual(ExpectedResized(golden), resized, golden.Size);
    }

    [Theory]
    [MemberData(nameof(JpegImages))]
    public void Jpeg_Decode_EqualsPilExactly(string id)
    {
        // The brief allowed +-2 levels (ImageSharp's own JPEG decoder is up to 73 levels off on these 4:2:0 noise
        // images); PilJpegDecoder follows libjpeg-turbo and is expected to match it bit for bit.
        GoldenImage golden = s_images[id];
        ImagingNpy reference = ImagingNpy.Read(golden.DecodedFile!);
        RgbImage decoded = ImageLoader.Load(golden.ImageFile);
        Assert.Equal([decoded.Height, decoded.Width, 3], reference.Shape);

        byte[] expected = reference.AsUInt8();
        int maxDifference = 0;
        long differing = 0;
        for (int i = 0; i < expected.Length; i++)
        {
            int difference = Math.Abs(expected[i] - decoded.Pixels[i]);
            maxDifference = Math.Max(maxDifference, difference);
            differing += difference != 0 ? 1 : 0;
        }

        output.WriteLine($"{id}: max |decoded - PIL| = {maxDifference}, {differing} of {expected.Length} samples differ");
        Assert.True(maxDifference == 0, $"{id}: JPEG decode differs from PIL in {differing} samples, by up to {maxDifference} levels");
    }

    [Theory]
    [MemberData(nameof(JpegImages))]
    public void Jpeg_ResizeOfPilDecodedPixels_EqualsGoldenResizedExactly(string id)
    {
        GoldenImage golden = s_images[id];
        Assert.NotNull(golden.ResizedFile);
        RgbImage resized = PilResize.Bicubic(ReferenceDecoded(golden), golden.Size, golden.Size);
        AssertPixelsEqual(ExpectedResized(golden), resized, golden.Size);
    }

    [Theory]
    [MemberData(nameof(AllImages))]
    public void PixelValues_FromTheImageFile_EqualGoldenExactly(string id)
    {
        GoldenImage golden = s_images[id];
        AssertPixelValuesEqualGolden(golden, ImageLoader.Load(golden.ImageFile));
    }

    [Theory]
    [MemberData(nameof(JpegImages))]
    public void PixelValues_FromPilDecodedJpegPixels_EqualGoldenExactly(string id)
    {
        // Starts from PIL's pixels, so a resize or rescale/normalise error cannot hide behind a decoder difference.
        GoldenImage golden = s_images[id];
        AssertPixelValuesEqualGolden(golden, ReferenceDecoded(golden));
    }

    private static void AssertPixelValuesEqualGolden(GoldenImage golden, RgbImage decoded)
    {
        ImagingNpy reference = ImagingNpy.Read(golden.PixelValuesFile);
        Assert.Equal([golden.BatchSize, 3, golden.Size, golden.Size], reference.Shape);
        float[] expected = GoldenImaging.BatchItem(reference.AsFloat32(), reference.Shape, golden.Index, golden.BatchSize);

        float[] actual = ImagePreprocessor.ToPixelValues(decoded, golden.Size);

        Assert.Equal(expected.Length, actual.Length);
        for (int i = 0; i < expected.Length; i++)
        {
            if (BitConverter.SingleToInt32Bits(expected[i]) != BitConverter.SingleToInt32Bits(actual[i]))
            {
                Assert.Fail($"{golden}: pixel_values[{i}] is {actual[i]:R}, reference {expected[i]:R}");
            }
        }
    }

    private static TheoryData<string> Ids(Func<GoldenImage, bool> predicate)
    {
        var data = new TheoryData<string>();
        foreach (GoldenImage image in s_images.Values.Where(predicate))
        {
            data.Add(image.ToString());
        }

        return data;
    }

    private static byte[] ExpectedResized(GoldenImage golden)
    {
        ImagingNpy reference = ImagingNpy.Read(golden.ResizedFile!);
        Assert.Equal([golden.BatchSize, golden.Size, golden.Size, 3], reference.Shape);
        return GoldenImaging.BatchItem(reference.AsUInt8(), reference.Shape, golden.Index, golden.BatchSize);
    }

    private static RgbImage ReferenceDecoded(GoldenImage golden)
    {
        ImagingNpy reference = ImagingNpy.Read(golden.DecodedFile!);
        Assert.Equal(3, reference.Shape.Length);
        return new RgbImage(reference.Shape[1], reference.Shape[0], reference.AsUInt8());
    }

    private static void AssertPixelsEqual(byte[] expected, RgbImage actual, int size)
    {
        Assert.Equal(size, actual.Width);
        Assert.Equal(size, actual.Height);
        Assert.Equal(expected.Length, actual.Pixels.Length);
        int mismatches = 0, first = -1;
        for (int i = 0; i < expected.Length; i++)
        {
            if (expected[i] != actual.Pixels[i])
            {
                mismatches++;
                first = first < 0 ? i : first;
            }
        }

        Assert.True(mismatches == 0,
            $"{mismatches} samples differ; first at pixel ({first / 3 % size}, {first / 3 / size}) channel {first % 3}: " +
            $"{actual.Pixels[Math.Max(first, 0)]} vs reference {expected[Math.Max(first, 0)]}");
    }
}
